"""One row → (prompt ids, completion ids) with an exact boundary; scoring and training both call this.

Why prompt and completion are tokenized separately and concatenated: tokenizing ``prompt + response`` as
one string lets BPE merge across the boundary (``":" + "\\n"``), so the first response token may or may not
exist (docs/methods.md §0). Concatenating ids fixes the boundary; since training uses the very same ids, the scored
text and the trained text are identical by construction.

The completion is the assistant turn exactly as the chat template closes it (e.g. ``response<|im_end|>\\n``
for ChatML), so training teaches the model to end its turn. Plain templates end the completion with the
tokenizer's EOS. ``Rendered.n_end`` counts those closing tokens: scoring leaves them out by default
(``score.response_end: exclude``, as the InstructDiff and Cherry reference code score the bare response),
because under the base model the end-of-turn token alone costs several nats and falls to ~0 after calibration,
which would make it a large share of every row's ΔNLL (docs/methods.md, "What is scored").

Multi-turn rows (``meta["history"]``: earlier [user, assistant] turns, e.g. LIMA) are rendered as the
conversation they are: the history becomes earlier turns of the prompt, and only the last response is the
completion (scored and trained).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any

from instructdiff.rows import Row, stable_hash

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PLAIN_TEMPLATES = {
    "alpaca": (ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT),
    # Superfiltering's "none" template: the instruction (and input) on their own lines.
    "plain": ("{instruction}\n{input}\n", "{instruction}\n"),
}


class Rendered:
    """One rendered row: its id, prompt and completion token ids, and ``n_end`` (the trailing completion tokens
    that close the turn, ``<|im_end|>`` + newline or EOS, not the response text).

    The ids are held packed, one immutable buffer of 32-bit integers for prompt and completion together (4 bytes
    a token, against 36 for a list entry and its int object), because the whole pool stays rendered through every
    pass over it (issue 15: 1.5 kB a row as lists). ``prompt_ids`` / ``completion_ids`` / ``token_ids`` return
    fresh lists of Python ints, equal to the ones the row was built from; ``n_prompt`` / ``n_completion`` give
    their lengths without building them. Immutable, like the frozen dataclass it replaces.
    """

    __slots__ = ("id", "_packed", "n_prompt", "n_completion", "n_end")

    def __init__(self, id: str, prompt_ids: Iterable[int], completion_ids: Iterable[int], n_end: int = 0) -> None:
        packed = array(_TOKEN_CODE)
        try:
            packed.extend(prompt_ids)
            n_prompt = len(packed)
            packed.extend(completion_ids)
        except (OverflowError, TypeError) as e:
            raise ValueError(f"row {id}: token ids must be integers that fit a C int ({e})") from e
        self._set(id, packed.tobytes(), n_prompt, len(packed) - n_prompt, int(n_end))

    def _set(self, id: str, packed: bytes, n_prompt: int, n_completion: int, n_end: int) -> None:
        for name, value in (("id", id), ("_packed", packed), ("n_prompt", n_prompt), ("n_completion", n_completion),
                            ("n_end", n_end)):
            object.__setattr__(self, name, value)

    @classmethod
    def _sharing(cls, other: Rendered, n_completion: int, n_end: int) -> Rendered:
        """``other`` with its completion cut to ``n_completion`` tokens, on the same buffer (no copy)."""
        new = cls.__new__(cls)
        new._set(other.id, other._packed, other.n_prompt, n_completion, n_end)
        return new

    def _ids(self, start: int, stop: int) -> list[int]:
        return memoryview(self._packed).cast(_TOKEN_CODE)[start:stop].tolist()

    @property
    def prompt_ids(self) -> list[int]:
        return self._ids(0, self.n_prompt)

    @property
    def completion_ids(self) -> list[int]:
        return self._ids(self.n_prompt, self.n_tokens)

    @property
    def token_ids(self) -> list[int]:
        """Prompt then completion ids: the sequence a forward pass reads."""
        return self._ids(0, self.n_tokens)

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_completion

    def for_scoring(self, response_end: str = "exclude") -> Rendered:
        """The tokens response signals are computed on: without the closing tokens unless ``include``.

        Dropping the tail of the completion is exact: under causal attention the scores of the earlier
        response tokens do not depend on what follows them."""
        if response_end not in RESPONSE_END_CHOICES:
            raise ValueError(f"score.response_end must be one of {RESPONSE_END_CHOICES}, got {response_end!r}")
        if response_end == "include" or self.n_end == 0:
            return self
        return Rendered._sharing(self, self.n_completion - self.n_end, 0)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Rendered is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Rendered is immutable: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rendered):
            return NotImplemented
        return ((self.id, self.n_prompt, self.n_completion, self.n_end)
                == (other.id, other.n_prompt, other.n_completion, other.n_end)
                and self._packed[: _TOKEN_BYTES * self.n_tokens] == other._packed[: _TOKEN_BYTES * other.n_tokens])

    def __hash__(self) -> int:
        return hash((self.id, self.n_prompt, self.n_completion, self.n_end))

    def __repr__(self) -> str:
        return (f"Rendered(id={self.id!r}, prompt_ids={self.prompt_ids!r}, completion_ids={self.completion_ids!r}, "
                f"n_end={self.n_end!r})")

    def __reduce__(self) -> tuple:
        # __setattr__ refuses, so pickle and copy rebuild through the constructor
        return Rendered, (self.id, self.prompt_ids, self.completion_ids, self.n_end)


# the stdlib array's C int (4 bytes wherever torch runs): packing and reading back go through the same code
_TOKEN_CODE = "i"
_TOKEN_BYTES = array(_TOKEN_CODE).itemsize


RESPONSE_END_CHOICES = ("exclude", "include")


def history_turns(row: Row) -> list[tuple[str, str]]:
    """Earlier (user, assistant) turns of a multi-turn row, oldest first; [] for a single-turn row."""
    return [(str(q), str(a)) for q, a in (row.meta.get("history") or [])]


def user_message(row: Row) -> str:
    """The user turn of a chat: the instruction, then the input (never dropped) after a blank line."""
    return row.instruction if not row.input.strip() else f"{row.instruction}\n\n{row.input}"


class Renderer:
    """Renders rows for one tokenizer and one template; ``fingerprint`` keys every cache that uses it."""

    def __init__(self, tokenizer: Any, template: str = "chat", system_prompt: str | None = None,
                 max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_length = max_length
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            # A base model without a chat template: fall back to the Alpaca template, loudly.
            import logging

            logging.getLogger(__name__).warning("tokenizer has no chat template; rendering with 'alpaca'")
            template = "alpaca"
        if template != "chat" and template not in PLAIN_TEMPLATES:
            raise ValueError(f"unknown template {template!r}; expected 'chat' or one of {sorted(PLAIN_TEMPLATES)}")
        self.template = template

    @property
    def fingerprint(self) -> str:
        return stable_hash({
            "template": self.template,
            "chat_template": getattr(self.tokenizer, "chat_template", None) if self.template == "chat" else None,
            "system": self.system_prompt,
            "max_length": self.max_length,
            "vocab": len(self.tokenizer),
            "eos": self.tokenizer.eos_token,
            "v": 2,  # 2: multi-turn history rendered as earlier turns
        })

    def texts(self, row: Row) -> tuple[str, str]:
        """(prompt text, completion text) for a row; earlier turns of a multi-turn row lead the prompt."""
        if self.template == "chat":
            messages = []
            for user, assistant in history_turns(row):
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            messages.append({"role": "user", "content": user_message(row)})
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": row.response}], tokenize=False
            )
            if not full.startswith(prompt):
                raise ValueError(
                    "the chat template does not render the prompt as a prefix of the full conversation; "
                    "use model.template=alpaca for this model"
                )
            return prompt, full[len(prompt):]
        with_input, without_input = PLAIN_TEMPLATES[self.template]
        # A plain template has no turns: earlier exchanges are written as earlier instruction/response
        # blocks of the same template, each closed by a blank line, before the current prompt.
        earlier = "".join(without_input.format(instruction=q, input="") + f"{a}\n\n"
                          for q, a in history_turns(row))
        prompt = earlier + (with_input if row.input.strip() else without_input).format(
            instruction=row.instruction, input=row.input)
        return prompt, row.response + (self.tokenizer.eos_token or "")

    def __call__(self, row: Row) -> Rendered:
        prompt, completion = self.texts(row)
        tok = self.tokenizer
        # Chat templates write BOS themselves; plain templates need the tokenizer's special tokens.
        prompt_ids = tok(prompt, add_special_tokens=self.template != "chat")["input_ids"]
        completion_ids = list(tok(completion, add_special_tokens=False)["input_ids"])
        return Rendered(row.id, list(prompt_ids), completion_ids, self._n_end(row, completion, completion_ids))

    def _n_end(self, row: Row, completion: str, completion_ids: list[int]) -> int:
        """How many trailing completion tokens lie after the response text (the turn's closing tokens)."""
        response = row.response
        cut = completion.rfind(response) if response else 0
        if cut < 0:  # a template that rewrites the content (e.g. strips it)
            response = response.strip()
            cut = completion.rfind(response)
        if cut < 0:
            raise ValueError(f"row {row.id}: the rendered completion does not contain the response text; "
                             "use model.template=alpaca for this model")
        end_chars = cut + len(response)
        if end_chars == len(completion):
            return 0
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            offsets = tok(completion, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            # a token that starts at or after the end of the response text is a closing token; one that
            # straddles the boundary (BPE merged response and suffix) belongs to the response
            return sum(1 for start, _ in offsets if start >= end_chars)
        response_ids = list(tok(completion[:end_chars], add_special_tokens=False)["input_ids"])
        if completion_ids[: len(response_ids)] != response_ids:
            raise ValueError(f"row {row.id}: cannot locate the end of the response among the completion tokens "
                             "(slow tokenizer and a merge across the boundary); use a fast tokenizer")
        return len(completion_ids) - len(response_ids)

    def unconditioned(self, row: Row) -> Rendered:
        """The same completion ids after a prompt with an empty instruction and input: the "direct answer"
        context of IFD / Superfiltering (docs/methods.md §2–§3), so both scores cover identical response tokens."""
        empty = Row(row.id, "", "", row.response)
        prompt, _ = self.texts(empty)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=self.template != "chat")["input_ids"]
        conditioned = self(row)
        return Rendered(row.id, list(prompt_ids), conditioned.completion_ids, conditioned.n_end)

    def prompt_ids(self, row: Row) -> list[int]:
        prompt, _ = self.texts(row)
        return list(self.tokenizer(prompt, add_special_tokens=self.template != "chat")["input_ids"])


def render_pool(renderer: Renderer, rows: list[Row]) -> tuple[list[Rendered], list[dict]]:
    """Render every row; rows over ``max_length`` tokens are dropped with reason ``too_long`` (never truncated:
    truncating would score and train on a different text than the row holds)."""
    kept: list[Rendered] = []
    dropped: list[dict] = []
    for row in rows:
        r = renderer(row)
        if not r.completion_ids:
            dropped.append({"id": row.id, "reason": "empty_completion"})
        elif renderer.max_length is not None and r.n_tokens > renderer.max_length:
            dropped.append({"id": row.id, "reason": f"too_long ({r.n_tokens} > {renderer.max_length} tokens)"})
        else:
            kept.append(r)
    return kept, dropped
