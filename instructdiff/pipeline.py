"""``run(cfg) -> dict``: calibrate → score → select → train → eval for one configuration.

Every expensive artifact lives in ``paths.cache_dir`` under a key hashed from its inputs, so a rerun (or
another multirun job with the same inputs) reuses it and says so:

    models/trained-<key>/      calibrated and trained models   key: base, rows in order, rendering, trainer, seed
    scores/<key>.npz           ScoreStore tables               key: model, rendered pool, scoring settings
    selections/<key>.json      selector output                 key: pool, base, rendering, selector, trainer, seed
    eval/<key>/                lm-eval results per model        key: model, eval config

The run directory gets results.json, selection.jsonl, subset.jsonl and manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from instructdiff import PROJECT_ROOT, __version__
from instructdiff.data import load_pool, original_records
from instructdiff.models import ModelRef, load_model, load_tokenizer, resolve_model, trained_ref
from instructdiff.queries import load_queries
from instructdiff.render import Renderer, render_pool
from instructdiff.rows import Row, fingerprint_rows, stable_hash
from instructdiff.scoring import ScoreStore, ScoreTable
from instructdiff.selection import Selection, SelectionContext, Selector
from instructdiff.tracking import Tracker

log = logging.getLogger("instructdiff")

STAGES = ("calibrate", "score", "select", "train", "eval")
# signals built from per-token response NLL/entropy: they follow score.response_end
RESPONSE_END_SIGNALS = frozenset({"token_stats"})
# Bump when a stage's output for the same inputs changes, so stale cache entries are not reused.
STAGE_VERSIONS = {"train": 1, "select": 1, "eval": 1}


class StageNotEnabled(RuntimeError):
    pass


def code_hash() -> str:
    """Hash of the framework's source (recorded in the manifest, not in cache keys)."""
    h = hashlib.sha256()
    for folder in ("instructdiff", "baselines"):
        for p in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            h.update(p.relative_to(PROJECT_ROOT).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _atomic_write_json(path: Path, obj: Any) -> None:
    """Publish ``obj`` at ``path`` whole or not at all (temp file + os.replace); clear OutputError on failure."""
    from instructdiff.atomic import atomic_write_json

    atomic_write_json(path, obj, path.name, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t0, 3)


class Pipeline:
    """One run. Methods are the stages; ``run`` wires them in order."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.cache = Path(cfg.paths.cache_dir).resolve()
        self.stages = list(cfg.pipeline.stages)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"pipeline.stages has unknown stage(s) {unknown}; known: {list(STAGES)}")
        self.seed = int(cfg.seed)
        self.timer = Timer()
        self.cache_events: list[dict] = []
        self.trainings: list[dict] = []
        # estimated FLOPs of every model pass asked for, cached or not (instructdiff.cost); see _cost_event
        self.cost_events: list[dict] = []
        self._selecting = False
        self.render_cfg = {"template": cfg.render.template, "system_prompt": cfg.render.system_prompt,
                           "max_length": cfg.domain.get("max_length")}
        self.trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        self._renderers: dict[str, tuple] = {}
        self._selector_refs: dict[str, ModelRef] = {}
        from instructdiff.render import RESPONSE_END_CHOICES

        self.response_end = str(cfg.score.get("response_end", "exclude"))
        if self.response_end not in RESPONSE_END_CHOICES:
            raise ValueError(f"score.response_end must be one of {list(RESPONSE_END_CHOICES)}, "
                             f"got {self.response_end!r}")
        # the pool is drawn by domain.pool_seed, never by the run's seed: every seed of a sweep sees the same
        # pool, so base-model signals are computed once and seeds differ only in what the seed decides
        self.pool_seed = int(cfg.domain.get("pool_seed", 0) or 0)

    def say(self, msg: str) -> None:
        log.info(msg)

    def note_cache(self, stage: str, key: str, hit: bool, what: str) -> None:
        self.cache_events.append({"stage": stage, "key": key, "hit": hit, "what": what})
        self.say(f"[{stage}] {'cached, skipping' if hit else 'computing'}: {what} ({key})")

    def _cost_event(self, stage: str, what: str, ref: ModelRef, cached: bool, estimate: Callable) -> None:
        """Record one model pass: ``estimate(ModelParams) -> {tokens, flops_uncached, ...}`` is its from-scratch
        cost; ``flops`` (incurred here) is 0 when it came from the cache. Passes made inside a selector's
        ``select`` are its selection cost. An estimate that fails is recorded as not estimated, never guessed."""
        from instructdiff.cost import model_params

        event: dict[str, Any] = {"stage": stage, "what": what, "model": ref.name, "cached": bool(cached),
                                 "selection": self._selecting}
        try:
            event.update(estimate(model_params(ref.path, ref.trust_remote_code, ref.revision)))
        except Exception as e:  # e.g. a config transformers cannot build: the run goes on, the gap is shown
            log.warning("no FLOPs estimate for %s (%s): %s", what, ref.name, e)
            event.update({"tokens": None, "flops_uncached": None, "rule": f"not estimated: {e}"})
        unc = event["flops_uncached"]
        event["flops"] = None if unc is None else (0.0 if cached else unc)
        self.cost_events.append(event)

    # -- calibrate / train ---------------------------------------------------------------------------
    def train_model(self, rows: list[Row], purpose: str, stage: str) -> ModelRef:
        key = stable_hash({"base": self.base.fingerprint, "rows": [r.id for r in rows],
                           "texts": stable_hash([r.response for r in rows]), "render": self.render_fp,
                           "trainer": self.trainer_cfg, "seed": self.seed, "v": STAGE_VERSIONS["train"]})
        out = self.cache / "models" / f"trained-{key}"
        with FileLock(str(out) + ".lock"):
            done = (out / "train_stats.json").exists()
            self.note_cache(stage, key, done, f"SFT on {len(rows)} rows ({purpose})")
            if not done:
                if stage not in self.stages:
                    raise StageNotEnabled(
                        f"{purpose} needs stage '{stage}', which is not in pipeline.stages={self.stages} "
                        f"and its output is not cached; add '{stage}' to pipeline.stages")
                from instructdiff.train import train_sft

                with self.timer.stage(stage):
                    train_sft(self.base, rows, self.cfg.trainer, self.render_cfg, out, self.seed, stage=stage)
            stats = json.loads((out / "train_stats.json").read_text())
        self.trainings.append({"purpose": purpose, "key": key, "cached": done, **stats})
        from instructdiff.cost import training_cost

        self._cost_event(stage, f"SFT on {len(rows)} rows ({purpose})", self.base, done,
                         lambda p: {**training_cost(p, self.trainer_cfg, stats), "rule": "training"})
        return trained_ref(f"{self.base.name}+{purpose}", out, key)

    # -- score ---------------------------------------------------------------------------------------
    def score_numerics(self) -> dict:
        """The scoring settings that change the numbers (and so the score and selection cache keys)."""
        return {"dtype": str(self.cfg.score.dtype), **({"compile": True} if self.cfg.score.get("compile") else {})}

    def score(self, ref: ModelRef, desc: str, variant: str = "conditioned") -> ScoreTable:
        # Batching changes the float summation order only within 1e-6; keep it out of the key so
        # a different batch size reuses scores. A compiled body fuses ops (and under bf16 skips roundings),
        # so its tables are keyed apart; uncompiled keys stay what they were.
        key_settings = self.score_numerics()
        settings = {"max_tokens_per_batch": int(self.cfg.score.max_tokens_per_batch),
                    "max_batch_size": int(self.cfg.score.max_batch_size),
                    "checkpoint_every": int(self.cfg.score.checkpoint_every),
                    "pad_id": int(self.renderer_for(ref)[0].tokenizer.pad_token_id),
                    "dtype": key_settings["dtype"], "compile": "compile" in key_settings}
        renderer, rendered, render_fp = self.renderer_for(ref)
        if variant == "unconditioned":
            by_id = {r.id: r for r in self.pool}
            key = ("unconditioned", render_fp)
            if key not in self._renderers:
                self._renderers[key] = [renderer.unconditioned(by_id[r.id]) for r in rendered]
            rendered = self._renderers[key]
        elif variant != "conditioned":
            raise ValueError(f"unknown scoring variant {variant!r}; expected conditioned | unconditioned")
        # end-of-turn tokens are trained on but, by default, not scored (score.response_end); the table's key
        # hashes every row's completion length, so the two choices never share a table
        rendered = [r.for_scoring(self.response_end) for r in rendered]
        desc = desc if variant == "conditioned" else f"{desc} ({variant})"
        settings = {**settings, "_key": key_settings}
        cached = self.store.response_path(ref.fingerprint, rendered, render_fp, settings).exists()
        self.note_cache("score", ref.fingerprint, cached, f"{desc} model scores")

        def loader():
            if "score" not in self.stages:
                raise StageNotEnabled(f"scores of {ref.name} are not cached and 'score' is not in pipeline.stages")
            return load_model(ref, dtype="float32", device=self.cfg.score.device)

        misses = self.store.misses
        with self.timer.stage("score"):
            table = self.store.response_stats(loader, ref.fingerprint, rendered, render_fp, settings,
                                              desc=f"score {desc}")
        from instructdiff.cost import signal_cost

        # NLL / entropy: one forward pass over prompt + response of every row
        self._cost_event("score", f"{desc} model scores", ref, self.store.misses == misses,
                         lambda p: signal_cost("response_stats", {}, rendered, p))
        return table

    def renderer_for(self, ref: ModelRef) -> tuple[Renderer, list, str]:
        """(renderer, rendered pool, render fingerprint) for a model's tokenizer; the base's when they match."""
        if ref.fingerprint == self.base.fingerprint or ref.path.startswith(str(self.cache / "models" / "trained-")):
            return self.renderer, self.rendered, self.render_fp
        cached = self._renderers.get(ref.fingerprint)
        if cached is None:
            tok = load_tokenizer(ref)
            renderer = Renderer(tok, template=self.render_cfg["template"],
                                system_prompt=self.render_cfg["system_prompt"], max_length=None)
            by_id = {r.id: r for r in self.pool}
            cached = (renderer, [renderer(by_id[r.id]) for r in self.rendered], renderer.fingerprint)
            self._renderers[ref.fingerprint] = cached
        return cached

    def signal(self, ref: ModelRef, name: str, rows: list[Row] | None = None, **options) -> dict:
        """A registered signal (instructdiff.signals) of ``ref`` over the pool, computed once and cached.

        ``rows``: compute it over these rows instead (e.g. a domain's query set), rendered with ``ref``'s
        renderer and cached by their content ids; rows the renderer drops (too long) are left out, and the
        result's ``ids`` array names the rows it holds, in order."""
        from instructdiff.cost import signal_cost
        from instructdiff.signals import SEED_DEPENDENT, SignalInputs, get_signal

        fn = get_signal(name)
        if name in RESPONSE_END_SIGNALS:
            # per-token response signals follow score.response_end like the means do; as an option it is
            # part of the signal's cache key
            options = {**options, "response_end": self.response_end}
        key_options = {k: options[k] for k in sorted(options)}
        if name in SEED_DEPENDENT:
            key_options["_run_seed"] = self.seed
        renderer, rendered, render_fp = self.renderer_for(ref)
        signal_rows, rows_fp = self.pool, self.pool_fp
        if rows is not None:
            rendered, _ = render_pool(renderer, rows)
            by_id = {r.id: r for r in rows}
            signal_rows = [by_id[r.id] for r in rendered]
            rows_fp = fingerprint_rows(signal_rows)

        def compute() -> dict:
            if "score" not in self.stages:
                raise StageNotEnabled(f"signal {name} of {ref.name} is not cached and 'score' is not in "
                                      "pipeline.stages")
            model = load_model(ref, dtype="float32", device=self.cfg.score.device)
            inputs = SignalInputs(model, renderer.tokenizer, renderer, signal_rows, rendered,
                                  next(model.parameters()).device, self.seed)
            out = fn(inputs, options)
            return out if rows is None else {**out, "ids": np.array([r.id for r in signal_rows], dtype=str)}

        what = f"{name} of {ref.name}" + ("" if rows is None else f" over {len(signal_rows)} given rows")
        misses = self.store.misses
        with self.timer.stage("score"):
            out = self.store.arrays(ref.fingerprint, rows_fp, render_fp, name, key_options, compute, what)
        self._cost_event("score", what, ref, self.store.misses == misses,
                         lambda p: signal_cost(name, options, rendered, p))
        return out

    def resolve_selector_model(self, selector: Selector) -> ModelRef:
        if not selector.model:
            return self.base
        if selector.model not in self._selector_refs:  # asked for by the results and by the selection
            self._selector_refs[selector.model] = self._resolve_named_model(selector.model)
        return self._selector_refs[selector.model]

    def _resolve_named_model(self, name: str) -> ModelRef:
        from instructdiff import CONF_DIR

        path = CONF_DIR / "model" / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
            raise ValueError(f"selector.model={name!r} is not a model config; known: {known}")
        return resolve_model(OmegaConf.load(path), self.cache)

    # -- select --------------------------------------------------------------------------------------
    def select(self, selector: Selector) -> Selection:
        selector_cfg = OmegaConf.to_container(self.cfg.selector, resolve=True)
        numerics = self.score_numerics()
        key = stable_hash({"pool": self.pool_fp, "base": self.base.fingerprint, "render": self.render_fp,
                           "selector": selector_cfg, "seed": self.seed, "v": STAGE_VERSIONS["select"],
                           "response_end": self.response_end,
                           "trainer": self.trainer_cfg if selector.uses_training else None,
                           # bf16 or compiled scores are other numbers, so another selection; fp32 eager adds
                           # nothing to the key, so selections cached before this entry stay valid
                           **({"score": numerics} if numerics != {"dtype": "fp32"} else {}),
                           # a selector that matches against domain.query depends on those rows' content
                           **({"queries": fingerprint_rows(load_queries(self.cfg.domain))}
                              if selector.uses_queries else {})})
        path = self.cache / "selections" / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self.note_cache("select", key, True, f"selection by {type(selector).__name__}")
            d = json.loads(path.read_text())
            self._restore_selection_cost(d.get("cost"))
            return Selection(d["selected"], d["status"], d["scores"], d["stats"])
        if "select" not in self.stages:
            raise StageNotEnabled("no cached selection for this configuration and 'select' is not in "
                                  "pipeline.stages")
        self.note_cache("select", key, False, f"selection by {type(selector).__name__}")
        ctx = SelectionContext(
            pool=self.pool, response_tokens=self.response_tokens, rng=np.random.default_rng(self.seed),
            seed=self.seed, base=self.base, score=self.score,
            calibrate=lambda rows, purpose: self.train_model(rows, f"calibration-{purpose}", "calibrate"),
            train=lambda rows, purpose: self.train_model(rows, f"selection-{purpose}", "calibrate"),
            signal=self.signal, selector_model=self.resolve_selector_model(selector),
            queries=lambda n=None: load_queries(self.cfg.domain, n), log=self.say,
        )
        t0 = time.time()
        before = dict(self.timer.seconds)
        n_events = len(self.cost_events)
        self._selecting = True  # every model pass from here on is this selector's selection cost
        try:
            selection = selector.select(ctx)
        finally:
            self._selecting = False
        self.selection_seconds = self.selection_seconds_recorded = round(time.time() - t0, 3)
        selection_cost = {"events": self.cost_events[n_events:], "seconds": self.selection_seconds}
        own = time.time() - t0 - sum(self.timer.seconds.get(k, 0) - before.get(k, 0) for k in self.timer.seconds)
        self.timer.seconds["select"] = round(own, 3)
        limit = selector.budget.limit(len(self.pool), ctx.pool_tokens)
        available = len(self.pool) if selector.budget.unit == "samples" else ctx.pool_tokens
        if limit > available:
            # not an error (budget.count=1000 on a small pool is a common sweep setting), but never silent
            note = (f"budget {limit} {selector.budget.unit} exceeds the pool's {available}: every row the "
                    f"selector kept is selected ({len(selection.selected)})")
            log.warning("[select] %s", note)
            selection.stats.setdefault("notes", []).append(note)
        from instructdiff.faults import crash_point

        crash_point("select.publish")
        _atomic_write_json(path, {"selected": selection.selected, "status": selection.status,
                                  "scores": selection.scores, "stats": selection.stats,
                                  "cost": selection_cost})
        return selection

    def _restore_selection_cost(self, cost: dict | None) -> None:
        """A cached selection costs nothing now; its recorded passes still tell what it costs from scratch."""
        self.selection_seconds = 0.0
        self.selection_seconds_recorded = (cost or {}).get("seconds")
        for e in (cost or {}).get("events", []):
            self.cost_events.append({**e, "cached": True, "selection": True,
                                     "flops": None if e.get("flops_uncached") is None else 0.0})

    def complexity_aware_rows(self, rows: list[Row]) -> tuple[list[Row], dict]:
        """Complexity-aware training (arXiv 2506.21220, docs/methods.md §6), offline form: easy and medium rows train
        on the final answer only, hard rows on the full chain of thought. Bands are the pool quartiles of the
        base model's first-answer-token entropy; ``domain.answer_marker`` splits reasoning from the answer."""
        from baselines.complexity import BANDS, complexity_bands

        marker = self.cfg.domain.get("answer_marker")
        if not marker:
            raise ValueError(f"trainer.complexity_aware needs domain.answer_marker (the string before the final "
                             f"answer, e.g. GSM8K's '####'); domain {self.cfg.domain.name} has none")
        table = self.score(self.base, "base")
        h = table.aligned("first_token_entropy", [r.id for r in self.pool])
        finite = np.isfinite(h)
        _, codes, q25, q75 = complexity_bands(h[finite])
        band_of = dict(zip([r.id for r, ok in zip(self.pool, finite, strict=True) if ok], codes.tolist(), strict=True))
        out, counts = [], {"easy": 0, "medium": 0, "hard": 0, "no_band": 0, "answer_only": 0, "no_marker": 0}
        for r in rows:
            band = band_of.get(r.id)
            counts[BANDS[band] if band is not None else "no_band"] += 1
            if band is None or BANDS[band] == "hard":
                out.append(r)
                continue
            cut = r.response.rfind(marker)
            if cut < 0:
                counts["no_marker"] += 1  # nothing to shorten: trained on the full response, and counted
                out.append(r)
                continue
            counts["answer_only"] += 1
            out.append(Row(r.id, r.instruction, r.input, r.response[cut:].strip(), r.meta))
        self.say(f"complexity-aware training: {counts}")
        return out, {**counts, "q25": q25, "q75": q75}

    # -- eval ----------------------------------------------------------------------------------------
    def evaluate(self, ref: ModelRef, label: str) -> dict:
        from instructdiff.evaluate import evaluate_model, task_files_fingerprint

        eval_cfg = OmegaConf.to_container(self.cfg.eval, resolve=True)
        if self.renderer.template != "chat":
            # evaluate with the prompt format the model was trained on
            eval_cfg["apply_chat_template"] = False
        key = stable_hash({"model": ref.fingerprint, "eval": eval_cfg, "tasks": task_files_fingerprint(),
                           "v": STAGE_VERSIONS["eval"]})
        out = self.cache / "eval" / key
        result_path = out / "eval_results.json"
        with FileLock(str(out) + ".lock"):
            from instructdiff.cost import count_forward_tokens, forward_flops

            # lm-eval's token counts are measured (count_forward_tokens) and kept beside the cached result
            cost_path = out / "eval_cost.json"
            if result_path.exists():
                self.note_cache("eval", key, True, f"{label} model evaluation")
                measured = json.loads(cost_path.read_text()) if cost_path.exists() else None
                self._cost_event("eval", f"{label} model evaluation", ref, True, lambda p: {
                    "tokens": measured["tokens"], "rule": "measured forward positions",
                    "flops_uncached": forward_flops(p.forward, measured["tokens"])} if measured else {
                    "tokens": None, "flops_uncached": None,
                    "rule": "not estimated: evaluated (and cached) before token counting"})
                return json.loads(result_path.read_text())
            self.note_cache("eval", key, False, f"{label} model evaluation")
            out.mkdir(parents=True, exist_ok=True)
            with self.timer.stage("eval"), count_forward_tokens() as counter:
                result = evaluate_model(ref, OmegaConf.create(eval_cfg), out, device=self.cfg.score.device)
            _atomic_write_json(cost_path, {"tokens": counter.tokens, "calls": counter.calls})
            self._cost_event("eval", f"{label} model evaluation", ref, False, lambda p: {
                "tokens": counter.tokens, "rule": "measured forward positions",
                "flops_uncached": forward_flops(p.forward, counter.tokens)})
            return result

    # -- whole run -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load and render the pool, resolve the base model: what every stage needs."""
        cfg = self.cfg
        with self.timer.stage("data"):
            rows, self.report = load_pool(cfg.domain, self.pool_seed)
            self.base = resolve_model(cfg.model, self.cache)
            self.tokenizer = load_tokenizer(self.base)
            self.renderer = Renderer(self.tokenizer, **self.render_cfg)
            self.render_fp = self.renderer.fingerprint
            self.rendered, self.render_dropped = render_pool(self.renderer, rows)
        self.rows = rows
        kept = {r.id for r in self.rendered}
        self.pool = [r for r in rows if r.id in kept]
        self.pool_fp = fingerprint_rows(self.pool)
        self.response_tokens = {r.id: len(r.completion_ids) for r in self.rendered}
        self.store = ScoreStore(self.cache / "scores")
        self.say(f"pool: {len(self.pool)} rows ({self.report.n_read} read, {len(self.report.dropped)} dropped "
                 f"on load, {len(self.render_dropped)} dropped by the renderer)")
        if not self.pool:
            raise ValueError("every pool row was dropped; see the reasons above")

    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # before any data or model work: a typo in a selector key fails in a second
        selector: Selector = _instantiate_selector(cfg.selector)
        self.prepare()
        if selector.uses_budget and any(s in self.stages for s in ("calibrate", "score", "select", "train")):
            selector.budget.check_selects_something(len(self.pool), int(sum(self.response_tokens.values())))
        rows, report, render_dropped = self.rows, self.report, self.render_dropped
        results: dict[str, Any] = {"run_dir": str(self.run_dir), "domain": cfg.domain.name,
                                   "model": self.base.name, "selector": type(selector).__name__,
                                   "seed": self.seed, "pool_seed": self.pool_seed, "stages": self.stages,
                                   # the model whose passes ranked the pool (a proxy for superfiltering)
                                   "scoring_model": self.resolve_selector_model(selector).name
                                   if selector.uses_models else None}
        selection = None
        if any(s in self.stages for s in ("calibrate", "score", "select", "train")):
            selection = self.select(selector)
            self._write_selection(selection, report.dropped + render_dropped, rows)
            results["selection"] = {**selection.stats, "n_pool": len(self.pool),
                                    "n_dropped_on_load": len(report.dropped),
                                    "n_dropped_by_renderer": len(render_dropped)}
            results["selection"].pop("warmup_ids", None)
        trained = None
        if "train" in self.stages:
            by_id = {r.id: r for r in self.pool}
            train_rows = [by_id[i] for i in selection.selected]
            if cfg.trainer.get("complexity_aware"):
                train_rows, results["complexity_aware"] = self.complexity_aware_rows(train_rows)
            trained = self.train_model(train_rows, "final", "train")
        results["trainings"] = self.trainings
        if "eval" in self.stages:
            results["eval"] = {"base": self.evaluate(self.base, "base")}
            if trained is not None:
                results["eval"]["trained"] = self.evaluate(trained, "trained")
        results["seconds"] = self.timer.seconds
        from instructdiff.cost import summarize

        results["cost"] = summarize(self.cost_events, self.timer.seconds, getattr(self, "selection_seconds", None),
                                    getattr(self, "selection_seconds_recorded", None))
        results["cache"] = {"events": self.cache_events, "score_store": self.store.stats(),
                            "hits": sum(e["hit"] for e in self.cache_events),
                            "misses": sum(not e["hit"] for e in self.cache_events)}
        _atomic_write_json(self.run_dir / "results.json", results)
        self._write_manifest(report, render_dropped, selection)
        return results

    def _write_selection(self, selection: Selection, load_dropped: list[dict], rows: list[Row]) -> None:
        """selection.jsonl holds every row read (dropped ones too); subset.jsonl the chosen rows.

        Both are published atomically, and only after the row accounting balances: a run that would lose a
        row raises instead of writing a record that looks complete.
        """
        from instructdiff.atomic import atomic_open

        self.accounting = self._accounting(selection)
        if not self.accounting["balanced"]:
            raise RuntimeError(f"row accounting does not balance, refusing to write selection.jsonl: "
                               f"{self.accounting}")
        with atomic_open(self.run_dir / "selection.jsonl", "w", "selection.jsonl", encoding="utf-8") as fh:
            rank = {i: k for k, i in enumerate(selection.selected)}
            for r in self.pool:
                status = selection.status[r.id]
                rec = {"id": r.id, "status": status.split(":")[0], "reason": status.split(":", 1)[1]
                       if ":" in status else None, "rank": rank.get(r.id),
                       "scores": {k: _finite_or_none(v) for k, v in selection.scores.get(r.id, {}).items()}}
                fh.write(json.dumps(rec) + "\n")
            for d in load_dropped:
                fh.write(json.dumps({"id": d.get("id"), "status": "dropped", "reason": d.get("reason"),
                                     "source": d.get("source"), "rank": None, "scores": {}}) + "\n")
        by_id = {r.id: r for r in rows}
        with atomic_open(self.run_dir / "subset.jsonl", "w", "subset.jsonl", encoding="utf-8") as fh:
            for rec in original_records([by_id[i] for i in selection.selected]):
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def _accounting(self, selection: Selection | None) -> dict:
        """selected + not_selected + dropped = input rows, with every drop reason counted.

        ``input_rows`` are the records read from the pool files (blank lines are not records). Rows left out
        by the ``domain.pool_size`` subsample count as dropped with reason ``not_in_pool_sample``; they are
        the only drops not listed one by one in selection.jsonl (``listed`` says how many lines it has).
        """
        from collections import Counter

        report, render_dropped = self.report, self.render_dropped
        reasons: Counter[str] = Counter(d["reason"].split(":", 1)[0] for d in report.dropped)
        not_sampled = report.n_available - report.n_kept
        if not_sampled:
            reasons["not_in_pool_sample"] += not_sampled
        reasons.update(d["reason"].split(" ", 1)[0] for d in render_dropped)
        selected = not_selected = 0
        if selection is None:
            not_selected = len(self.pool)
        else:
            for status in selection.status.values():
                if status == "selected":
                    selected += 1
                elif status == "not_selected":
                    not_selected += 1
                else:
                    reasons[status.split(":", 1)[1] if ":" in status else status] += 1
        dropped = sum(reasons.values())
        return {"input_rows": report.n_read, "selected": selected, "not_selected": not_selected,
                "dropped": dropped, "dropped_reasons": dict(sorted(reasons.items())),
                "listed": len(self.pool) + len(report.dropped) + len(render_dropped),
                "balanced": selected + not_selected + dropped == report.n_read
                and (selection is None or len(selection.status) == len(self.pool))}

    def _write_manifest(self, report, render_dropped: list[dict], selection: Selection | None) -> None:
        import torch
        import transformers
        import trl

        from instructdiff.tracking import mask_secrets

        manifest = {
            "instructdiff_version": __version__, "code_hash": code_hash(),
            # keys that look like credentials (token, key, secret, password) are masked: manifests get shared
            "config": mask_secrets(OmegaConf.to_container(self.cfg, resolve=True)),
            "base_model": {"name": self.base.name, "path": self.base.path, "fingerprint": self.base.fingerprint},
            "data_files": {f: _sha256(f) for f in sorted({r.meta["source_file"] for r in self.rows
                                                             if "source_file" in r.meta})},
            "pool": {"fingerprint": self.pool_fp, "render_fingerprint": self.render_fp,
                     "pool_seed": self.pool_seed, "pool_size": self.cfg.domain.get("pool_size"), "seed": self.seed,
                     "response_end": self.response_end,
                     "report": report.to_dict() if hasattr(report, "to_dict") else str(report),
                     "n_dropped_by_renderer": len(render_dropped)},
            "counts": selection.stats.get("counts") if selection else None,
            "accounting": getattr(self, "accounting", None) or self._accounting(selection),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "trl": trl.__version__},
        }
        _atomic_write_json(self.run_dir / "manifest.json", manifest)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _instantiate_selector(selector_cfg: DictConfig) -> Selector:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from instructdiff.config_check import check_selector_cfg

    name = HydraConfig.get().runtime.choices.get("selector") if HydraConfig.initialized() else None
    check_selector_cfg(selector_cfg, name)

    from hydra.errors import InstantiationException

    from instructdiff.selection import BudgetError

    try:
        selector = instantiate(selector_cfg, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, BudgetError):  # the user's budget, not a bug: its own message
            raise e.__cause__ from None
        raise
    if not isinstance(selector, Selector):
        raise TypeError(f"selector._target_ must build an instructdiff.selection.Selector, got {type(selector)}")
    return selector


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.paths.get("run_dir"):
        return Path(cfg.paths.run_dir).resolve()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError("paths.run_dir is not set and no Hydra run is active")


def print_summary(results: dict, echo: Callable[[str], None] = print) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"instructdiff · {results['domain']} · {results['selector']} · seed {results['seed']}")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("trained", justify="right")
    ev = results.get("eval", {})
    base_m = ev.get("base", {}).get("metrics", {})
    trained_m = ev.get("trained", {}).get("metrics", {})
    for k in sorted(set(base_m) | set(trained_m)):
        table.add_row(k, _fmt(base_m.get(k)), _fmt(trained_m.get(k)))
    sel = results.get("selection", {})
    console = Console()
    if sel:
        c = sel.get("counts", {})
        console.print(f"selection: {c.get('selected')} selected, {c.get('not_selected')} not selected, "
                      f"{c.get('dropped')} dropped ({sel.get('dropped_reasons')})")
    if results.get("scoring_model") and results.get("scoring_model") != results.get("model"):
        console.print(f"scored by: {results['scoring_model']} (selecting for {results.get('model')})")
    console.print(f"time per stage (s): {results.get('seconds')}")
    cost = results.get("cost") or {}
    if cost.get("selection_flops_uncached") is not None:
        console.print(f"estimated FLOPs: selection {cost['selection_flops_uncached']:.3g} from scratch "
                      f"({cost.get('selection_flops', 0):.3g} in this run), training {cost.get('train_flops', 0):.3g}, "
                      f"eval {cost.get('eval_flops', 0):.3g}")
    console.print(f"cache: {results['cache']['hits']} hits, {results['cache']['misses']} misses")
    if ev:
        console.print(table)
    console.print(f"outputs: {results['run_dir']}")


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def run(cfg: DictConfig) -> dict:
    """Run the configured stages; returns the results dict that is also written to results.json."""
    run_dir = resolve_run_dir(cfg)
    from instructdiff.atomic import ensure_dir
    from instructdiff.sweep import stage_metrics, tracker_identity

    # before W&B or any stage touches it: an unwritable paths.run_dir fails in a second, with the reason
    ensure_dir(run_dir, "the run directory (paths.run_dir)")
    pipeline = Pipeline(cfg, run_dir)
    tracker = Tracker(cfg.get("logger"), run_dir, OmegaConf.to_container(cfg, resolve=True),
                      **tracker_identity(cfg, run_dir))
    try:
        results = pipeline.run()
        tracker.log(stage_metrics(results))
        for label, ev in results.get("eval", {}).items():
            tracker.log({f"{label}/{k}": v for k, v in ev.get("metrics", {}).items()})
        sel_path = run_dir / "selection.jsonl"
        if tracker.run is not None and sel_path.exists():
            recs = [json.loads(x) for x in sel_path.read_text().splitlines()]
            signals = sorted({k for r in recs for k in r["scores"]})
            tracker.table("selection", ["id", "status", "reason", "rank", *signals],
                          [[r["id"], r["status"], r["reason"], r["rank"], *[r["scores"].get(s) for s in signals]]
                           for r in recs])
        if tracker.sync_hint:
            results["wandb_sync"] = tracker.sync_hint
        return results
    finally:
        tracker.finish()
