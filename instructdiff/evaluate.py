"""Evaluation stage: lm-eval benchmarks of one model (base or trained) on instructdiff's own tasks, offline.

``evaluate_model(ref, eval_cfg, work_dir)`` renders the task YAMLs of ``instructdiff/lm_eval_tasks`` into
``work_dir/tasks`` (lm-eval resolves ``data_files`` against the working directory, so the bundled files get
absolute paths there), wraps the loaded model in lm-eval's ``HFLM`` and runs ``lm_eval.simple_evaluate``.
It returns and writes to ``work_dir/eval_results.json``::

    {"metrics":   {"<task>/<metric>": float},   # NaN only where "unchecked" says why
     "skipped":   {"<task>": "reason"},          # tasks asked for but not run
     "n_samples": {"<task>": int},               # docs scored, after eval.limit
     "unchecked": {"<task>": {"prompts": n, "instructions": m, "reason": "..."}},
     "settings":  {...}}                          # resolved settings, e.g. whether the chat template was used

Launched as several processes (torchrun, SLURM tasks) every rank runs its share of the items, lm-eval's own
data-parallel split, and returns rank 0's result; rank 0 alone writes (``make_lm``, ``evaluate_model``).

Prompts follow the training renderer: with a chat template the task's user turn goes through it (lm-eval's
``apply_chat_template``); without one, through the Alpaca template the trainer falls back to.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from instructdiff import DATA_DIR
from instructdiff.models import ModelRef, load_model, load_tokenizer

log = logging.getLogger(__name__)

TASKS_SRC = Path(__file__).resolve().parent / "lm_eval_tasks"
CODE_TASKS = frozenset({"id_humaneval", "id_mbpp"})
PROMPT_STYLES = ("chat", "alpaca")

CODE_OFF = "code execution is off; set eval.allow_code_execution=true to run generated code"
LOGLIK_ONLY = "eval.loglikelihood_only is true (eval=quick): generation tasks are not run"

DEFAULTS: dict[str, Any] = {
    "tasks": [],
    "limit": 100,
    "batch_size": 8,
    "max_gen_toks": 256,
    "apply_chat_template": "auto",
    "allow_code_execution": False,
    "num_fewshot": None,
    "dtype": "float32",
    "seed": 0,
    "loglikelihood_only": False,
    "generation_limit": None,
    "task_limits": {},
}


def eval_settings(eval_cfg: Any) -> dict[str, Any]:
    """The eval config as a plain dict over ``DEFAULTS`` (interpolations such as ``${domain.eval_tasks}``
    resolved)."""
    if eval_cfg is None:
        given: dict[str, Any] = {}
    else:
        from omegaconf import OmegaConf

        given = OmegaConf.to_container(eval_cfg, resolve=True) if OmegaConf.is_config(eval_cfg) else dict(eval_cfg)
    settings = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}}
    if not isinstance(settings["allow_code_execution"], bool):
        # bool("false") is True: a string here must not switch code execution on
        raise ValueError(f"eval.allow_code_execution must be true or false, got "
                         f"{settings['allow_code_execution']!r}")
    tasks = settings["tasks"] or []
    # `eval.tasks=id_gsm8k` on the command line arrives as a string, not a one-item list.
    settings["tasks"] = list(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
    settings["task_limits"] = _task_limits(settings["task_limits"])
    return settings


def checked_eval_settings(eval_cfg: Any) -> dict[str, Any]:
    """``eval_settings`` with every task name checked: a run calls it before any data or model work, so a typo
    in ``eval.tasks`` or ``eval.task_limits`` fails in a second, not after training."""
    settings = eval_settings(eval_cfg)
    known = task_output_types()
    unknown = [t for t in settings["tasks"] if t not in known]
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; instructdiff defines {sorted(known)}")
    return settings


def _task_limits(given: Any) -> dict[str, int | None]:
    """``eval.task_limits`` checked: a mapping of task names defined here to a positive item count or null."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ValueError(f"eval.task_limits must map task names to an item count or null, got {given!r}")
    known = task_output_types()
    out: dict[str, int | None] = {}
    for task, limit in given.items():
        if task not in known:
            close = difflib.get_close_matches(str(task), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"eval.task_limits names unknown task {task!r}{hint}; instructdiff defines "
                             f"{sorted(known)}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"eval.task_limits.{task} must be a positive number of items or null (every item), "
                             f"got {limit!r}")
        out[str(task)] = limit
    return out


def task_limit(task: str, output_type: str, settings: dict[str, Any]) -> int | None:
    """Items of ``task`` to evaluate: its ``eval.task_limits`` entry, else ``generation_limit`` for a generation
    task (when set), else ``limit``."""
    if task in settings["task_limits"]:
        return settings["task_limits"][task]
    if output_type == "generate_until" and settings["generation_limit"] is not None:
        return settings["generation_limit"]
    return settings["limit"]


def _task_yamls() -> dict[str, tuple[Path, str]]:
    """Task name → (its YAML file, its lm-eval output_type), read with a regex: the ``!function`` tags need
    lm-eval's loader, and only these two fields are wanted."""
    found = {}
    for path in sorted(TASKS_SRC.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        name = re.search(r"^task:\s*(\S+)", text, flags=re.M)
        kind = re.search(r"^output_type:\s*(\S+)", text, flags=re.M)
        if name and kind:
            found[name.group(1)] = (path, kind.group(1))
    return found


def task_output_types() -> dict[str, str]:
    """Task name → lm-eval output_type."""
    return {name: kind for name, (_path, kind) in _task_yamls().items()}


def task_files_fingerprint(tasks: Iterable[str]) -> str:
    """Hash of the YAMLs of ``tasks`` and of utils.py, which they all share: an eval cache key must change when
    a prompt or metric of one of its tasks does, and only then (a new or edited task file elsewhere leaves the
    cached evaluations of every other task valid)."""
    files = _task_yamls()
    h = hashlib.sha256()
    for task in sorted(set(tasks)):
        if task not in files:
            raise ValueError(f"unknown eval task {task!r}; instructdiff defines {sorted(files)}")
        h.update(files[task][0].name.encode())
        h.update(files[task][0].read_bytes())
    h.update(b"utils.py")
    h.update((TASKS_SRC / "utils.py").read_bytes())
    return h.hexdigest()[:16]


def render_tasks(dest: str | Path, prompt_style: str = "chat") -> Path:
    """Write the task YAMLs with absolute data paths and the prompt style filled in, plus ``utils.py``."""
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}; got {prompt_style!r}")
    dest = Path(dest)
    # A task file left from an older run would still be indexed by the TaskManager.
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    # Inside a double-quoted YAML scalar; JSON string escaping is valid there.
    data_dir = json.dumps(DATA_DIR.resolve().as_posix())[1:-1]
    missing = []
    for src in sorted(TASKS_SRC.glob("*.yaml")):
        text = src.read_text(encoding="utf-8").replace("{DATA_DIR}", data_dir)
        text = text.replace("{PROMPT_STYLE}", prompt_style)
        for data_file in re.findall(r'^\s*data_files:\s*"([^"]+)"', text, flags=re.M):
            if not Path(data_file).is_file():
                missing.append(f"{src.stem}: {data_file}")
        (dest / src.name).write_text(text, encoding="utf-8")
    shutil.copy2(TASKS_SRC / "utils.py", dest / "utils.py")
    if missing:
        raise FileNotFoundError("eval data files not found (the repo's data/ folder is incomplete): "
                                + "; ".join(missing))
    return dest


def _resolve_chat(setting: Any, tokenizer: Any) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "auto":
        return has_template
    if isinstance(setting, bool):
        if setting and not has_template:
            raise ValueError("eval.apply_chat_template=true but the tokenizer has no chat template; "
                             "use auto or false")
        return setting
    raise ValueError(f"eval.apply_chat_template must be auto, true or false; got {setting!r}")


_LM_CLASS = None


def make_lm(model: Any, tokenizer: Any, batch_size: int, rank: int = 0, world_size: int = 1):
    """HFLM over an already-loaded model, with the tokenizer always given (else it asks the Hub).

    ``rank`` / ``world_size`` > 1 (the joined process group's): lm-eval's data-parallel mode, in which every rank
    runs every ``world_size``-th item of each task and rank 0 gathers the per-item metrics and aggregates them.
    Every rank must then call ``simple_evaluate`` with the same tasks; it returns None on the other ranks."""
    global _LM_CLASS
    if _LM_CLASS is None:
        from lm_eval.models.huggingface import HFLM

        class SplitEncodingHFLM(HFLM):
            """Tokenizes context and continuation separately, as ``render.py`` does for training.

            Stock lm-eval tokenizes ``context + continuation`` as one string and moves the context's trailing
            whitespace into the continuation, so with a prompt ending "assistant\\n" the scored tokens would
            include that newline (and BPE may merge across the boundary): bits per byte of the reference would
            then not be the likelihood of the reference alone, nor what training optimised.
            """

            def __init__(self, *args: Any, rank: int = 0, world_size: int = 1, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._group = (int(rank), int(world_size))

            def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
                return self.tok_encode(context), self.tok_encode(continuation, add_special_tokens=False)

            # Data-parallel. lm-eval's evaluator splits each task's items by ``lm.rank`` / ``lm.world_size`` and
            # gathers the metrics with ``lm.gather_object`` (torch.distributed); HFLM reports the group, and
            # makes the Accelerator its ``all_gather`` / ``barrier`` go through, only for a model it loads itself
            # from a path, ranking by the node-local index (one node). Here the group is the joined one (global
            # ranks, any number of nodes) and the two collectives use it directly: object collectives, which work
            # on gloo and NCCL whatever device the model is on, and need no Accelerate state besides TRL's.
            @property
            def rank(self) -> int:
                return self._group[0]

            @property
            def world_size(self) -> int:
                return self._group[1]

            def all_gather(self, tensor: Any) -> Any:
                """Every rank's ``tensor`` concatenated along dim 0 (a scalar counts as one element), as
                ``Accelerator.gather`` returns it; lm-eval gathers request counts with it."""
                if self.world_size <= 1:
                    return tensor
                import torch

                parts: list[Any] = [None] * self.world_size
                torch.distributed.all_gather_object(parts, tensor.detach().cpu())
                return torch.cat([p.reshape(1) if p.dim() == 0 else p for p in parts]).to(tensor.device)

            def barrier(self) -> None:
                if self.world_size > 1:
                    from instructdiff import distributed

                    distributed.barrier()

            # lm-eval's generation bar moves once per batch (eval_console): this one moves per item
            _item_bar = None

            def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
                from instructdiff.eval_console import generation_bar

                bar = generation_bar(len(requests), disable=disable_tqdm or self.rank != 0)
                self._item_bar = None if bar.disable else bar
                try:
                    return super().generate_until(requests, disable_tqdm=True)
                finally:
                    self._item_bar = None
                    bar.close()

            def _model_generate(self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any):
                if self._item_bar is not None:
                    from instructdiff.eval_console import ItemProgress

                    generation_kwargs["streamer"] = ItemProgress(self._item_bar, self.tokenizer, stop,
                                                                 max_length - context.shape[1])
                return super()._model_generate(context, max_length, stop, **generation_kwargs)

        _LM_CLASS = SplitEncodingHFLM
    from instructdiff.eval_console import quiet_repeated_logs

    quiet_repeated_logs()  # before HFLM's own warnings
    return _LM_CLASS(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), rank=rank,
                     world_size=world_size)


def _skip_reason(task: str, output_type: str, settings: dict[str, Any]) -> str | None:
    if settings["loglikelihood_only"] and output_type == "generate_until":
        return LOGLIK_ONLY
    if task in CODE_TASKS and settings["allow_code_execution"] is not True:
        return CODE_OFF
    if task == "id_ifeval":
        from instructdiff.lm_eval_tasks import utils

        return utils.ifeval_unavailable()
    return None


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _collect(out: dict[str, Any], tasks: list[str], result: dict[str, Any]) -> None:
    from instructdiff.lm_eval_tasks import utils

    for task in tasks:
        entry = out.get("results", {}).get(task)
        if entry is None:
            result["skipped"][task] = "lm-eval returned no results for this task"
            continue
        counts: dict[str, int] = {}
        nan_metrics = []
        for key, value in entry.items():
            if "," not in key:
                continue  # "alias"
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            if metric.startswith("unchecked_"):
                counts[metric.removeprefix("unchecked_")] = int(_to_float(value))
                continue
            name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}/{filt}"
            result["metrics"][name] = _to_float(value)
            if math.isnan(result["metrics"][name]):
                nan_metrics.append(metric)
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            result["n_samples"][task] = int(n)
        if any(counts.values()):
            result["unchecked"][task] = {**counts, "reason": utils.PUNKT_MISSING}
        elif nan_metrics:
            result["unchecked"][task] = {"reason": f"lm-eval returned no value for {', '.join(nan_metrics)}"}


def _write(result: dict[str, Any], path: Path) -> None:
    # eval_results.json is the eval cache's "done" marker: it must appear whole or not at all
    from instructdiff.atomic import atomic_write_json

    atomic_write_json(path, result, "eval results", sort_keys=True)


def evaluate_model(ref: ModelRef, eval_cfg: Any, work_dir: Path, device: str = "auto",
                   publish: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the configured tasks on ``ref``; see the module docstring for the returned dict. ``publish(result)``
    writes it instead of ``work_dir/eval_results.json`` (the pipeline's eval cache records a checksum with it).

    In a joined process group every rank must call this: each evaluates its share of the items (lm-eval's
    data-parallel mode, ``make_lm``), every rank returns rank 0's result, and only rank 0 writes into
    ``work_dir``; ``publish`` is called on every rank (it may hold a collective) and must write on rank 0 only."""
    from instructdiff import distributed

    rank, world = (distributed.rank(), distributed.world_size()) if distributed.joined() else (0, 1)
    if rank != 0:
        from instructdiff.eval_console import quiet_other_ranks

        quiet_other_ranks(rank)
    settings = checked_eval_settings(eval_cfg)
    work_dir = Path(work_dir)
    if rank == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
    known = task_output_types()

    result: dict[str, Any] = {"metrics": {}, "skipped": {}, "n_samples": {}, "unchecked": {}}
    to_run = []
    for task in settings["tasks"]:
        reason = _skip_reason(task, known[task], settings)
        if reason:
            result["skipped"][task] = reason
        else:
            to_run.append(task)
    result["settings"] = {**settings, "model": ref.name, "model_fingerprint": ref.fingerprint,
                          "task_files": task_files_fingerprint(settings["tasks"])}

    if to_run:
        # the other ranks render the task files for themselves: only rank 0 writes into the cache
        scratch = tempfile.TemporaryDirectory(prefix="instructdiff-eval-") if rank != 0 else None
        model = None
        lms: dict[bool, Any] = {}
        try:
            # no collective in here: a rank that cannot load stops every rank before lm-eval's collectives
            with distributed.fail_together(f"loading {ref.name} for evaluation"):
                tokenizer = load_tokenizer(ref)
                chat = _resolve_chat(settings["apply_chat_template"], tokenizer)
                task_dir = render_tasks(Path(scratch.name if scratch else work_dir) / "tasks",
                                        "chat" if chat else "alpaca")
                model = load_model(ref, settings["dtype"], device)
            result["settings"].update(apply_chat_template=chat, prompt_style="chat" if chat else "alpaca")
            # One lm-eval call per (item limit, generates): lm-eval takes one limit for all the tasks of a call.
            # Generation costs ~100x a log-likelihood item on a CPU, so it gets its own limit.
            by_limit: dict[tuple[int | None, bool], list[str]] = {}
            for t in to_run:
                generates = known[t] == "generate_until"
                by_limit.setdefault((task_limit(t, known[t], settings), generates), []).append(t)
            groups = [(tasks, limit, generates) for (limit, generates), tasks in by_limit.items()]
            # an error once lm-eval's collectives are behind every rank (aggregating, collecting) reaches them all
            with distributed.fail_together(f"evaluating {ref.name}"):
                for tasks, limit, generates in groups:
                    if not tasks:
                        continue
                    split = _splits(limit, settings, world)
                    if not split and rank != 0:
                        continue
                    if split not in lms:
                        lms[split] = make_lm(model, tokenizer, settings["batch_size"],
                                             *((rank, world) if split else (0, 1)))
                    out = _simple_evaluate(lms[split], tasks, task_dir, {**settings, "limit": limit}, chat,
                                           generates)
                    if rank == 0:
                        _collect(out, tasks, result)
        finally:
            lms.clear()
            del model
            gc.collect()
            _empty_cuda_cache()
            if scratch is not None:
                scratch.cleanup()
        result = distributed.broadcast(result) if world > 1 else result

    if any(t in CODE_TASKS for t in to_run):
        from instructdiff.lm_eval_tasks import utils

        result["settings"]["code_sandbox"] = utils.sandbox_info()
    from instructdiff.faults import crash_point

    crash_point("eval.publish")
    if publish is not None:
        publish(result)
    elif rank == 0:
        _write(result, work_dir / "eval_results.json")
    log.info("eval %s: %s (skipped: %s)", ref.name, result["metrics"], sorted(result["skipped"]))
    return result


def _splits(limit: int | None, settings: dict[str, Any], world: int) -> bool:
    """Whether a group of tasks runs data-parallel over ``world`` processes, or on rank 0 alone.

    lm-eval gives rank r the items r, r + world, ...: a rank left with no item of a task fails in lm-eval (it
    reads the task's first request), so fewer items than processes run on rank 0. Few-shot prompts too: lm-eval
    draws each rank's examples from one generator in that rank's item order, so they would depend on the
    number of processes, and so would the metrics."""
    if world <= 1 or settings["num_fewshot"]:
        return False
    return limit is None or int(limit) >= world


def _simple_evaluate(lm: Any, tasks: list[str], task_dir: Path, settings: dict[str, Any], chat: bool,
                     generates: bool) -> dict[str, Any] | None:
    # lm_eval.evaluator itself, not `lm_eval.simple_evaluate`: that imports the module (and makes its logger)
    # only when called, after the filter below was attached
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    from instructdiff.eval_console import quiet_repeated_logs

    quiet_repeated_logs()  # again: the lm-eval modules imported since have their own loggers
    seed = int(settings["seed"])
    out = evaluator.simple_evaluate(
        model=lm,
        tasks=tasks,
        # include_defaults=False: indexing lm-eval's thousands of built-in tasks costs seconds and none is used.
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        limit=settings["limit"],
        num_fewshot=settings["num_fewshot"],
        batch_size=int(settings["batch_size"]),
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        gen_kwargs={"max_gen_toks": int(settings["max_gen_toks"])} if generates else None,
        # Bootstrapped stderrs would cost minutes for nothing the pipeline reads.
        bootstrap_iters=0,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        confirm_run_unsafe_code=bool(settings["allow_code_execution"]),
    )
    if out is None and lm.rank == 0:  # lm-eval returns None on its other ranks only
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return out


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the eval cache ------------------------------------------------------------------------------------------
def cached_evaluation(runner: Any, cache: Path, ref: ModelRef, label: str, eval_cfg: dict[str, Any],
                      device: str = "auto") -> dict[str, Any]:
    """``evaluate_model`` of ``ref`` through the stage runner (instructdiff.stages), cached in
    ``cache/eval/<key>/`` with its checksum and fingerprint; the forward positions lm-eval ran are measured
    (``count_forward_tokens``) and kept beside the result, for the FLOPs of a later cache hit."""
    from omegaconf import OmegaConf

    from instructdiff import distributed
    from instructdiff.cache_check import CORRUPT, BadEntry, Entry, read_json, write_json
    from instructdiff.cost import count_forward_tokens, forward_flops
    from instructdiff.rows import stable_hash
    from instructdiff.stages import STAGE_VERSIONS

    key = stable_hash({"model": ref.fingerprint, "eval": eval_cfg,
                       "tasks": task_files_fingerprint(eval_settings(eval_cfg)["tasks"]),
                       "v": STAGE_VERSIONS["eval"]})
    out = Path(cache) / "eval" / key
    result_path, cost_path = out / "eval_results.json", out / "eval_cost.json"
    fingerprint = {"key": key, "model": ref.fingerprint}

    def check(doc: dict) -> None:  # a result cached before results recorded a checksum
        if not isinstance(doc.get("metrics"), dict) or not isinstance(doc.get("skipped"), dict):
            raise BadEntry(CORRUPT, "it has no metrics or skipped tasks")

    def read() -> tuple[dict, dict | None]:
        return read_json(result_path, fingerprint, check), (read_json(cost_path, fingerprint)
                                                            if cost_path.exists() else None)

    counted: dict[str, int] = {}

    def compute() -> tuple[dict, dict]:
        with count_forward_tokens() as counter:
            def publish(result: dict) -> None:  # on every rank; the counts first: the result marks the entry done
                # each rank ran the model on its share of the items: the entry records the group's work
                counted.update(tokens=_group_sum(counter.tokens), calls=_group_sum(counter.calls))
                if distributed.is_main():
                    write_json(cost_path, counted, fingerprint, "eval token counts")
                    write_json(result_path, result, fingerprint, "eval results", sort_keys=True)

            result = evaluate_model(ref, OmegaConf.create(eval_cfg), out, device=device, publish=publish)
        return result, {"tokens": counted["tokens"]}

    def estimate(params: Any, value: tuple[dict, dict | None]) -> dict:
        measured = value[1]
        if not measured:
            return {"tokens": None, "flops_uncached": None,
                    "rule": "not estimated: evaluated (and cached) before token counting"}
        return {"tokens": measured["tokens"], "rule": "measured forward positions",
                "flops_uncached": forward_flops(params.forward, measured["tokens"])}

    # Under several processes (a joined group) every rank evaluates its share of the items (lm-eval's
    # data-parallel mode, evaluate_model) while rank 0 alone holds the lock, publishes the entry and decides
    # hit or miss for all (cache_check.serve_in_group, a ``together`` entry); every rank returns rank 0's result.
    together = distributed.joined()
    (result, _), _ = runner.run("eval", f"{label} model evaluation", key,
                                Entry(result_path, read, compute, Path(f"{out}.lock"), together=together),
                                ref, estimate)
    return result


def _group_sum(n: int) -> int:
    """``n`` summed over the joined process group (``n`` itself for one process); every rank must call it."""
    from instructdiff import distributed

    if not distributed.joined():
        return n
    import torch.distributed as dist

    counts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, int(n))
    return sum(counts)
