"""Renderer: exact prompt/completion boundary, templates, length filter, fingerprint (tiny tokenizer, offline)."""

from __future__ import annotations

from typing import Any

import pytest
from omegaconf import OmegaConf

from instructdiff import CONF_DIR
from instructdiff.models import load_tokenizer, resolve_model
from instructdiff.render import Rendered, Renderer, render_pool, user_message
from instructdiff.rows import Row
from instructdiff.train import build_dataset

CHATML_END = "<|im_end|>\n"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
# Distinctive words that occur in no template and no instruction below.
MARKERS = ("ZQXJ", "vqwkz", "7319")
RESPONSE = "ZQXJ vqwkz: the result is 7319."


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    ref = resolve_model(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"), tmp_path_factory.mktemp("cache"))
    return load_tokenizer(ref)


def dec(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def row_with_input() -> Row:
    return Row.make("Add the two numbers below.", "first 12, second 30", RESPONSE)


def row_no_input() -> Row:
    return Row.make("Name a colour of the sky.", "", RESPONSE)


def many_rows() -> list[Row]:
    return [Row.make(f"Question number {i}: what is {i} plus {i}?", "" if i % 2 else f"hint {i}",
                     f"ZQXJ {i} + {i} = {2 * i}" + " more words" * (i % 4)) for i in range(8)]


# ----------------------------------------------------------------------------------------------- boundary


@pytest.mark.parametrize("row_fn", [row_with_input, row_no_input])
def test_chat_boundary_is_exact(tok: Any, row_fn) -> None:
    row = row_fn()
    r = Renderer(tok, "chat")(row)
    assert isinstance(r, Rendered) and r.id == row.id
    assert r.prompt_ids and r.completion_ids
    completion = dec(tok, r.completion_ids)
    prompt = dec(tok, r.prompt_ids)
    assert completion == RESPONSE + CHATML_END
    assert prompt.endswith(ASSISTANT_HEADER)
    assert prompt.startswith("<|im_start|>user\n")
    for marker in MARKERS:
        assert marker not in prompt
    # The boundary sits exactly between the two decoded halves.
    assert dec(tok, r.prompt_ids + r.completion_ids) == prompt + RESPONSE + CHATML_END
    # The end-of-turn token itself is part of the completion (learned and scored), exactly once.
    assert r.completion_ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1
    assert r.n_tokens == len(r.prompt_ids) + len(r.completion_ids)


def test_texts_match_decoded_ids(tok: Any) -> None:
    renderer = Renderer(tok, "chat")
    row = row_with_input()
    prompt_text, completion_text = renderer.texts(row)
    r = renderer(row)
    assert dec(tok, r.prompt_ids) == prompt_text
    assert dec(tok, r.completion_ids) == completion_text == RESPONSE + CHATML_END
    assert renderer.prompt_ids(row) == r.prompt_ids


def test_chat_system_prompt_is_in_prompt_only(tok: Any) -> None:
    row = row_with_input()
    r = Renderer(tok, "chat", system_prompt="You are a careful helper.")(row)
    prompt = dec(tok, r.prompt_ids)
    assert prompt.startswith("<|im_start|>system\nYou are a careful helper.<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith(ASSISTANT_HEADER)
    assert dec(tok, r.completion_ids) == RESPONSE + CHATML_END


def test_scoring_and_training_see_identical_ids(tok: Any) -> None:
    renderer = Renderer(tok, "chat")
    rows = many_rows()
    rendered, dropped = render_pool(renderer, rows)
    assert dropped == [] and [r.id for r in rendered] == [r.id for r in rows]
    ds = build_dataset(rows, renderer)
    assert len(ds) == len(rows)
    for k, (row, r) in enumerate(zip(rows, rendered, strict=True)):
        direct = renderer(row)
        assert direct == r
        ids = ds[k]["input_ids"]
        mask = ds[k]["completion_mask"]
        assert ids == r.prompt_ids + r.completion_ids
        assert len(mask) == len(ids)
        assert mask == [0] * len(r.prompt_ids) + [1] * len(r.completion_ids)
        # The masked-in ids are exactly the completion, which decodes to the response + end of turn.
        assert [t for t, m in zip(ids, mask, strict=True) if m] == r.completion_ids
        assert dec(tok, [t for t, m in zip(ids, mask, strict=True) if m]) == row.response + CHATML_END


# ----------------------------------------------------------------------------------------------- input field


def test_user_message_keeps_input() -> None:
    assert user_message(Row.make("Do X.", "the context", "y")) == "Do X.\n\nthe context"
    assert user_message(Row.make("Do X.", "", "y")) == "Do X."
    assert user_message(Row.make("Do X.", "  \n", "y")) == "Do X."


def test_input_in_chat_prompt(tok: Any) -> None:
    prompt = dec(tok, Renderer(tok, "chat")(row_with_input()).prompt_ids)
    assert "Add the two numbers below.\n\nfirst 12, second 30<|im_end|>" in prompt


def test_alpaca_template_with_and_without_input(tok: Any) -> None:
    renderer = Renderer(tok, "alpaca")
    with_input = renderer(row_with_input())
    p = dec(tok, with_input.prompt_ids)
    assert "### Instruction:\nAdd the two numbers below.\n\n### Input:\nfirst 12, second 30\n\n### Response:\n" in p
    assert p.endswith("### Response:\n")
    assert p.startswith("Below is an instruction that describes a task, paired with an input")
    for marker in MARKERS:
        assert marker not in p

    no_input = renderer(row_no_input())
    q = dec(tok, no_input.prompt_ids)
    assert "### Input" not in q
    assert "paired with an input" not in q
    assert q.endswith("### Instruction:\nName a colour of the sky.\n\n### Response:\n")


def test_plain_template_with_and_without_input(tok: Any) -> None:
    renderer = Renderer(tok, "plain")
    assert dec(tok, renderer(row_with_input()).prompt_ids) == "Add the two numbers below.\nfirst 12, second 30\n"
    assert dec(tok, renderer(row_no_input()).prompt_ids) == "Name a colour of the sky.\n"


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_plain_templates_end_completion_with_eos(tok: Any, template: str) -> None:
    r = Renderer(tok, template)(row_with_input())
    assert r.completion_ids[-1] == tok.eos_token_id
    assert dec(tok, r.completion_ids) == RESPONSE + tok.eos_token
    assert tok.eos_token_id not in r.completion_ids[:-1]


# ----------------------------------------------------------------------------------------------- length filter


def test_too_long_rows_are_dropped_never_truncated(tok: Any) -> None:
    rows = many_rows()
    full = [Renderer(tok, "chat")(r) for r in rows]
    lengths = sorted({r.n_tokens for r in full})
    assert len(lengths) >= 3
    limit = lengths[len(lengths) // 2]  # some rows are exactly at the limit, some above
    renderer = Renderer(tok, "chat", max_length=limit)
    kept, dropped = render_pool(renderer, rows)
    expect_kept = [r for r in full if r.n_tokens <= limit]
    expect_dropped = [r.id for r in full if r.n_tokens > limit]
    assert expect_kept and expect_dropped
    assert any(r.n_tokens == limit for r in kept)  # "longer than", not "at least"
    assert kept == expect_kept  # identical ids, nothing cut
    assert [d["id"] for d in dropped] == expect_dropped
    for d in dropped:
        assert d["reason"].startswith("too_long")
    assert len(kept) + len(dropped) == len(rows)


def test_no_max_length_keeps_everything(tok: Any) -> None:
    rows = many_rows()
    kept, dropped = render_pool(Renderer(tok, "chat"), rows)
    assert len(kept) == len(rows) and dropped == []


# ----------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(tok: Any) -> None:
    base = Renderer(tok, "chat")
    assert base.fingerprint == base.fingerprint == Renderer(tok, "chat").fingerprint
    assert isinstance(base.fingerprint, str) and base.fingerprint
    variants = [
        Renderer(tok, "alpaca"),
        Renderer(tok, "plain"),
        Renderer(tok, "chat", system_prompt="Be brief."),
        Renderer(tok, "chat", system_prompt="Be verbose."),
        Renderer(tok, "chat", max_length=128),
        Renderer(tok, "chat", max_length=256),
    ]
    fps = [base.fingerprint] + [v.fingerprint for v in variants]
    assert len(set(fps)) == len(fps)
    assert Renderer(tok, "chat", max_length=128).fingerprint == variants[4].fingerprint


def test_unknown_template_raises(tok: Any) -> None:
    with pytest.raises(ValueError, match="unknown template"):
        Renderer(tok, "vicuna")


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_unconditioned_keeps_completion_and_drops_instruction(tok: Any, template: str) -> None:
    renderer = Renderer(tok, template)
    row = row_with_input()
    full, direct = renderer(row), renderer.unconditioned(row)
    assert direct.completion_ids == full.completion_ids  # IFD compares losses over identical tokens
    prompt = dec(tok, direct.prompt_ids)
    assert "Add the two numbers" not in prompt and "first 12" not in prompt
    assert len(direct.prompt_ids) < len(full.prompt_ids) and direct.prompt_ids


# ------------------------------------------------------------------------------- end of turn, multi-turn


def test_closing_tokens_are_counted_and_left_out_of_scoring_only_on_request(tok: Any) -> None:
    row = row_with_input()
    chat = Renderer(tok, "chat")(row)
    # ChatML closes the turn with <|im_end|> and a newline: exactly those tokens, nothing of the response
    assert chat.n_end >= 1
    assert dec(tok, chat.completion_ids[len(chat.completion_ids) - chat.n_end:]) == CHATML_END
    scored = chat.for_scoring("exclude")
    assert dec(tok, scored.completion_ids) == RESPONSE
    assert scored.prompt_ids == chat.prompt_ids and scored.n_end == 0
    assert chat.for_scoring("include") is chat
    plain = Renderer(tok, "alpaca")(row)
    assert plain.n_end == 1 and plain.completion_ids[-1] == tok.eos_token_id
    assert dec(tok, plain.for_scoring("exclude").completion_ids) == RESPONSE
    # the direct-answer (IFD) rendering scores the very same response tokens
    uncond = Renderer(tok, "chat").unconditioned(row)
    assert uncond.for_scoring("exclude").completion_ids == scored.completion_ids
    with pytest.raises(ValueError, match="response_end"):
        chat.for_scoring("drop")


def test_a_response_that_ends_inside_a_merged_token_keeps_that_token() -> None:
    """A BPE merge across the response/suffix boundary belongs to the response (never dropped from it)."""

    class MergingTok:  # a fast tokenizer whose last response character merges with the first suffix one
        is_fast = True
        chat_template = None
        eos_token = "Z"

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            spans = [(k, k + 1) for k in range(len(text) - 2)] + [(len(text) - 2, len(text))]
            out = {"input_ids": list(range(len(spans)))}
            if return_offsets_mapping:
                out["offset_mapping"] = spans
            return out

    renderer = Renderer.__new__(Renderer)
    renderer.tokenizer = MergingTok()
    row = Row.make("q", "", "abc")
    ids = list(range(3))  # "a", "b", "cZ"
    assert renderer._n_end(row, "abcZ", ids) == 0


def lima_row() -> Row:
    history = [["First question ZQXJ?", "First answer vqwkz."], ["Second question?", "Second answer 7319."]]
    return Row.make("Third question: and now?", "", "Third answer, the one scored.", {"history": history})


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_multi_turn_row_renders_its_history_as_earlier_turns(tok: Any, template: str) -> None:
    row = lima_row()
    renderer = Renderer(tok, template)
    r = renderer(row)
    prompt, completion = dec(tok, r.prompt_ids), dec(tok, r.completion_ids)
    # the history comes first, in order, and only the last response is the completion
    positions = [prompt.find(t) for t in ("First question ZQXJ?", "First answer vqwkz.", "Second question?",
                                          "Second answer 7319.", "Third question: and now?")]
    assert -1 not in positions and positions == sorted(positions), positions
    assert "Third answer" not in prompt
    assert completion.startswith("Third answer, the one scored.")
    assert dec(tok, r.for_scoring("exclude").completion_ids) == "Third answer, the one scored."
    if template == "chat":
        assert prompt.count("<|im_start|>assistant\n") == 3  # two earlier assistant turns + the generation prompt
        assert prompt.count("<|im_start|>user\n") == 3
    # the loss mask covers exactly the last response and its closing tokens
    ds = build_dataset([row], renderer)
    ids, mask = ds[0]["input_ids"], ds[0]["completion_mask"]
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    assert trained == r.completion_ids and ids == r.prompt_ids + r.completion_ids
    assert sum(mask) == len(r.completion_ids) and mask[: len(r.prompt_ids)] == [0] * len(r.prompt_ids)
    # a single-turn row with the same last exchange renders a strictly shorter prompt
    single = Renderer(tok, template)(Row.make(row.instruction, "", row.response))
    assert single.completion_ids == r.completion_ids and len(single.prompt_ids) < len(r.prompt_ids)


def test_bundled_lima_multi_turn_rows_keep_their_history(tok: Any) -> None:
    from omegaconf import OmegaConf

    from instructdiff.data import load_pool

    cfg = OmegaConf.load(CONF_DIR / "domain" / "general.yaml")
    cfg.pool_size = None
    rows, report = load_pool(cfg, seed=0)
    multi = [r for r in rows if r.meta.get("history")]
    assert report.n_multi_turn == len(multi) > 0
    row = multi[0]
    prompt = dec(tok, Renderer(tok, "chat")(row).prompt_ids)
    first_user, first_assistant = row.meta["history"][0]
    assert first_user[:40] in prompt and first_assistant[:40] in prompt
