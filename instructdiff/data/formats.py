"""Format mappers: one raw record of a known dataset format -> one :class:`Row`, and format detection.

All knowledge of GSM8K, MedMCQA, LIMA, ... lives here; every stage downstream sees only ``Row`` objects.
"""

from __future__ import annotations

from collections.abc import Callable

from instructdiff.data.errors import DataError, Record
from instructdiff.data.fields import (
    _absent,
    _extras,
    _history,
    _int,
    _missing,
    _opt_str,
    _preview,
    _str,
    _str_list,
)
from instructdiff.rows import Row


def _instruction_style(rec: Record, response_keys: tuple[str, ...], *, history_required: bool = False) -> Row:
    instruction = _str(rec, "instruction", what="the task")
    input_ = _opt_str(rec, "input")
    key = next((k for k in response_keys if k in rec and rec[k] is not None), None)
    if key is None:
        null = next((k for k in response_keys if k in rec), None)  # present, but every one present is null
        if null is not None:
            raise DataError(f"field {null!r} is null; expected a string (the target response)", field=null)
        alias = f" (nor its alias {response_keys[1]!r})" if len(response_keys) > 1 else ""
        raise DataError(f"field {response_keys[0]!r} missing{alias}; expected a string (the target response)",
                        field=response_keys[0])
    response = _str(rec, key, nonempty=False, what="the target response")
    history = _history(rec, required=history_required)
    meta = _extras(rec, {"instruction", "input", key, "history"})
    if history is not None:
        meta["history"] = history
    return Row.make(instruction, input_, response, meta)


def _generic(rec: Record) -> Row:
    return _instruction_style(rec, ("response", "output"))


def _alpaca(rec: Record) -> Row:
    return _instruction_style(rec, ("output",))


def _lima(rec: Record) -> Row:
    return _instruction_style(rec, ("output",), history_required=True)


def _gsm8k(rec: Record) -> Row:
    question = _str(rec, "question", what="the problem")
    answer = _str(rec, "answer", nonempty=False, what="worked solution ending in a '#### <number>' line")
    final = ""
    if answer.strip():  # empty answers are dropped later as empty_response, not a format error
        if "####" not in answer:
            raise DataError("field 'answer' has no '#### <number>' line; expected the GSM8K worked solution "
                            "ending in '#### <final answer>'", field="answer")
        final = answer.rsplit("####", 1)[1].strip()
    meta = {"final_answer": final, **_extras(rec, {"question", "answer"})}
    return Row.make(question, "", answer, meta)


def _mcq_prompt(question: str, options: dict[str, str]) -> str:
    return question.rstrip() + "\n" + "\n".join(f"{letter}. {text.strip()}" for letter, text in options.items())


def _mcq_answer(letter: str, text: str, explanation: str = "") -> str:
    text = text.strip()
    # Options that already end in a full stop would otherwise render as "...end..".
    answer = f"The answer is {letter}: {text}" + ("" if text.endswith(".") else ".")
    return answer + (f"\n\nExplanation: {explanation.strip()}" if explanation.strip() else "")


def _medmcqa(rec: Record) -> Row:
    question = _str(rec, "question", what="the question")
    options = {letter: _str(rec, f"op{letter.lower()}", what=f"option {letter}") for letter in "ABCD"}
    letter = "ABCD"[_int(rec, "cop", 0, 3)]
    explanation = _opt_str(rec, "exp")
    meta = {"final_answer": letter, "answer_text": options[letter], "subject": rec.get("subject_name"),
            **_extras(rec, {"question", "opa", "opb", "opc", "opd", "cop", "exp", "subject_name"})}
    return Row.make(_mcq_prompt(question, options), "", _mcq_answer(letter, options[letter], explanation), meta)


def _medqa(rec: Record) -> Row:
    question = _str(rec, "question", what="the question")
    raw = rec.get("options")
    expected = "an object mapping letters A..D (or A..E) to option strings"
    if raw is None:
        raise _absent(rec, "options", expected)
    if (not isinstance(raw, dict) or sorted(raw) not in (list("ABCD"), list("ABCDE"))
            or not all(isinstance(v, str) and v.strip() for v in raw.values())):
        raise DataError(f"field 'options' is {_preview(raw)}; expected {expected}", field="options")
    options = {k: raw[k] for k in sorted(raw)}
    letter = _str(rec, "answer_idx", what="the correct option letter")
    if letter not in options:
        raise DataError(f"field 'answer_idx' is {letter!r}; expected one of {', '.join(options)}", field="answer_idx")
    meta = {"final_answer": letter, "answer_text": options[letter],
            **_extras(rec, {"question", "options", "answer_idx", "answer"})}
    return Row.make(_mcq_prompt(question, options), "", _mcq_answer(letter, options[letter]), meta)


def _mmlu(rec: Record) -> Row:
    question = _str(rec, "question", what="the question")
    choices = _str_list(rec, "choices", what="2 to 5 options")
    if not 2 <= len(choices) <= 5:
        raise DataError(f"field 'choices' has {len(choices)} options; expected 2 to 5", field="choices")
    options = {"ABCDE"[i]: text for i, text in enumerate(choices)}
    letter = "ABCDE"[_int(rec, "answer", 0, len(choices) - 1)]
    meta = {"final_answer": letter, "answer_text": options[letter], **_extras(rec, {"question", "choices", "answer"})}
    return Row.make(_mcq_prompt(question, options), "", _mcq_answer(letter, options[letter]), meta)


def _pubmedqa(rec: Record) -> Row:
    question = _str(rec, "QUESTION", what="the question")
    contexts = _str_list(rec, "CONTEXTS", what="the abstract's paragraphs")
    long_answer = _str(rec, "LONG_ANSWER", nonempty=False, what="the conclusion")
    decision = _str(rec, "final_decision", what="yes, no or maybe")
    if decision not in ("yes", "no", "maybe"):
        raise DataError(f"field 'final_decision' is {decision!r}; expected yes, no or maybe", field="final_decision")
    response = f"{long_answer.strip()}\n\nThe answer is {decision}." if long_answer.strip() else ""
    meta = {"final_answer": decision,
            **_extras(rec, {"QUESTION", "CONTEXTS", "LONG_ANSWER", "final_decision", "LABELS", "MESHES"})}
    return Row.make(question, "\n\n".join(c.strip() for c in contexts), response, meta)


def _math(rec: Record) -> Row:
    problem = _str(rec, "problem", what="the problem")
    solution = _str(rec, "solution", nonempty=False, what="the worked solution")
    meta = {"final_answer": _opt_str(rec, "answer"), **_extras(rec, {"problem", "solution", "answer"})}
    return Row.make(problem, "", solution, meta)


def _mbpp(rec: Record) -> Row:
    text = _str(rec, "text", what="the task description")
    code = _str(rec, "code", nonempty=False, what="the reference solution")
    tests = _str_list(rec, "test_list", what="assert statements")
    if "task_id" not in rec:
        raise _missing("task_id", "an integer")
    # The tests pin down the function name and signature; without them the task is underspecified.
    instruction = f"{text.strip()}\nYour code should pass these tests:\n" + "\n".join(tests)
    # MBPP ships Windows line endings; training on them would teach the model to emit "\r".
    response = code.replace("\r\n", "\n")
    meta = {"task_id": rec["task_id"], "test_list": tests, "test_setup_code": _opt_str(rec, "test_setup_code"),
            **_extras(rec, {"text", "code", "task_id", "test_list", "test_setup_code"})}
    return Row.make(instruction, "", response, meta)


FORMATS: dict[str, Callable[[Record], Row]] = {
    "generic": _generic,
    "alpaca": _alpaca,
    "codealpaca": _alpaca,
    "chatdoctor": _alpaca,
    "lima": _lima,
    "gsm8k": _gsm8k,
    "math": _math,
    "medmcqa": _medmcqa,
    "medqa": _medqa,
    "mmlu": _mmlu,
    "pubmedqa": _pubmedqa,
    "mbpp": _mbpp,
}

#: Fields each format reads; appended to record errors so the user sees the whole contract at once.
FORMAT_FIELDS: dict[str, str] = {
    "generic": "instruction, optional input, response (or output), optional history",
    "alpaca": "instruction, optional input, output, optional history",
    "codealpaca": "instruction, optional input, output",
    "chatdoctor": "instruction, optional input, output",
    "lima": "instruction, optional input, output, history",
    "gsm8k": "question, answer ending in '#### <number>'",
    "math": "problem, solution, optional answer",
    "medmcqa": "question, opa, opb, opc, opd, cop (0-3), optional exp",
    "medqa": "question, options {A..D}, answer_idx",
    "mmlu": "question, choices [..], answer (index)",
    "pubmedqa": "QUESTION, CONTEXTS, LONG_ANSWER, final_decision",
    "mbpp": "text, code, test_list, task_id",
}

# First match wins: specific formats before the catch-all instruction/response one.
_DETECT: list[tuple[str, tuple[str, ...]]] = [
    ("lima", ("instruction", "output", "history")),
    ("medmcqa", ("question", "opa", "cop")),
    ("medqa", ("question", "options", "answer_idx")),
    ("mmlu", ("question", "choices", "answer")),
    ("gsm8k", ("question", "answer")),
    ("pubmedqa", ("QUESTION", "CONTEXTS")),
    ("mbpp", ("text", "code", "test_list")),
    ("math", ("problem", "solution")),
    ("generic", ("instruction", "response")),
    ("generic", ("instruction", "output")),
]


def detect_format(record: Record) -> str | None:
    """The format whose required keys the record has, or None."""
    return next((name for name, keys in _DETECT if all(k in record for k in keys)), None)


def _check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
