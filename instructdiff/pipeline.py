"""``run(cfg) -> dict``: calibrate → score → select → train → eval for one configuration.

Every expensive artifact lives in ``paths.cache_dir`` under a key hashed from its inputs, so a rerun (or
another multirun job with the same inputs) reuses it and says so:

    models/trained-<key>/      calibrated and trained models   key: base, rows in order, rendering, trainer, seed
    scores/<key>.npz           ScoreStore tables               key: model, rendered pool, scoring settings
    selections/<key>.json      selector output                 key: pool, base, rendering, selector, trainer, seed
    eval/<key>/                lm-eval results per model        key: model, eval config

Each stage is one call of ``StageRunner.run`` (instructdiff.stages: log, lock, stage check, cost), and each
entry records its checksum and the fingerprint of its inputs (instructdiff.cache_check), so a damaged or
misplaced entry is recomputed, never served. The run directory gets results.json, selection.jsonl,
subset.jsonl and manifest.json (instructdiff.run_outputs).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from instructdiff import distributed
from instructdiff.cache_check import (
    CORRUPT,
    BadEntry,
    Entry,
    check_model_dir,
    read_json,
    seal_dir,
    verify_dir,
    write_json,
)
from instructdiff.data import PoolReport, load_pool
from instructdiff.models import ModelRef, load_tokenizer, resolve_model, trained_ref
from instructdiff.queries import load_queries
from instructdiff.render import Rendered, Renderer, render_pool
from instructdiff.rows import Row, fingerprint_rows, stable_hash
from instructdiff.run_outputs import (
    json_default,
    print_summary,
    records_same_work,
    write_manifest,
    write_selection,
)
from instructdiff.run_outputs import write_json as write_run_file
from instructdiff.score_stage import PoolScorer
from instructdiff.score_store import ScoreStore
from instructdiff.scoring import ScoreTable
from instructdiff.selection import Selection, SelectionContext, Selector, declared_context
from instructdiff.selector_factory import instantiate_selector
from instructdiff.stages import STAGE_VERSIONS, STAGES, StageNotEnabled, StageRunner, Timer
from instructdiff.tracking import Tracker

__all__ = ["STAGES", "Pipeline", "Prepared", "StageNotEnabled", "print_summary", "resolve_run_dir", "run"]

log = logging.getLogger("instructdiff")

# trainer flag -> (conf/selector/<name>.yaml, function of that selector's module) that rewrites the rows the final
# model trains on, called as fn(rows, ctx, domain_cfg) -> (rows, info for results.json[flag]). It is found
# through the selector's config, so the framework names no plugin module.
TRAINING_ROW_HOOKS = {"complexity_aware": ("complexity", "complexity_aware_rows")}


@dataclass
class Prepared:
    """What every stage needs, made once by ``Pipeline.prepare``: the pool as read and as rendered, the base."""

    rows: list[Row]              # every row the loader kept (the renderer may drop more)
    report: PoolReport
    base: ModelRef
    tokenizer: Any
    renderer: Renderer
    render_fp: str
    rendered: list[Rendered]
    render_dropped: list[dict]
    pool: list[Row]              # the rows the renderer kept: what selectors see
    pool_fp: str
    response_tokens: dict[str, int]  # completion tokens per pool row, as trained


def _prepared(name: str) -> property:
    return property(lambda self: getattr(self.need_prepared(), name), doc=f"``Prepared.{name}`` of this run")


def trainer_cache_key(trainer_cfg: dict) -> dict:
    """The trainer settings a trained model's cache key hashes. ``strategy: auto`` (added with multi-process
    training) is left out so the models cached before it stay valid; a process count above one enters the key,
    since it changes the batches each step sees unless the user kept the global batch."""
    from instructdiff import distributed

    key = {k: v for k, v in trainer_cfg.items() if not (k == "strategy" and v == "auto")}
    # Recomputing activations changes how much memory training holds, not the weights: bit-identical on CPU
    # with and without it (tests/test_train_checkpointing.py; the default run's calibrated SmolLM2-135M too,
    # 2026-12-06). Recorded as the old default, false, so models cached before the default became true serve.
    if "gradient_checkpointing" in key:
        key["gradient_checkpointing"] = False
    # Memory only, the same bits (tests/test_lean_lm_head.py): left out, so every cached model stays valid.
    key.pop("lm_head_fold_rows", None)
    if distributed.world_size() > 1:
        key["world_size"] = distributed.world_size()
    return key


class Pipeline:
    """One run. Methods are the stages, each one call of its StageRunner; ``run`` wires them in order."""

    # what prepare() made, read as attributes of the pipeline (the tests and instructdiff.score_pool do)
    base = _prepared("base")
    pool = _prepared("pool")
    rows = _prepared("rows")
    report = _prepared("report")
    rendered = _prepared("rendered")
    render_dropped = _prepared("render_dropped")
    renderer = _prepared("renderer")
    render_fp = _prepared("render_fp")
    pool_fp = _prepared("pool_fp")
    response_tokens = _prepared("response_tokens")
    tokenizer = _prepared("tokenizer")

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.cache = Path(cfg.paths.cache_dir).resolve()
        self.runner = StageRunner(list(cfg.pipeline.stages), log.info)
        self.seed = int(cfg.seed)
        self.trainings: list[dict] = []
        self.render_cfg = {"template": cfg.render.template, "system_prompt": cfg.render.system_prompt,
                           "max_length": cfg.domain.get("max_length")}
        self.trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        self.trainer_key = trainer_cache_key(self.trainer_cfg)
        self.store = ScoreStore(self.cache / "scores")
        self.prepared: Prepared | None = None
        self.scorer: PoolScorer | None = None
        self.accounting: dict | None = None
        from instructdiff.render import RESPONSE_END_CHOICES

        self.response_end = str(cfg.score.get("response_end", "exclude"))
        if self.response_end not in RESPONSE_END_CHOICES:
            raise ValueError(f"score.response_end must be one of {list(RESPONSE_END_CHOICES)}, "
                             f"got {self.response_end!r}")
        # the pool is drawn by domain.pool_seed, never by the run's seed: every seed of a sweep sees the same
        # pool, so base-model signals are computed once and seeds differ only in what the seed decides
        self.pool_seed = int(cfg.domain.get("pool_seed", 0) or 0)

    @property
    def stages(self) -> list[str]:
        return self.runner.enabled

    @stages.setter
    def stages(self, value: list[str]) -> None:  # instructdiff.score_pool runs the score stage alone
        self.runner.enabled = list(value)

    def need_prepared(self) -> Prepared:
        if self.prepared is None:
            raise RuntimeError("Pipeline.prepare() has not run: the pool and base model are not loaded yet")
        return self.prepared

    # -- calibrate / train ---------------------------------------------------------------------------
    def train_model(self, rows: list[Row], purpose: str, stage: str) -> ModelRef:
        from instructdiff.cost import training_cost

        p = self.need_prepared()
        key = stable_hash({"base": p.base.fingerprint, "rows": [r.id for r in rows],
                           "texts": stable_hash([r.response for r in rows]), "render": p.render_fp,
                           "trainer": self.trainer_key, "seed": self.seed, "v": STAGE_VERSIONS["train"]})
        out = self.cache / "models" / f"trained-{key}"
        fingerprint = {"key": key, "base": p.base.fingerprint, "rows": len(rows), "seed": self.seed}

        def stats() -> dict:
            return json.loads((out / "train_stats.json").read_text())

        def read() -> dict:
            verify_dir(out, fingerprint, lambda d: check_model_dir(d, "train_stats.json"))
            return stats()

        def compute() -> dict:
            from instructdiff.train import train_sft

            # train.py publishes the directory itself (tmp + rename, rank 0); its record follows at once
            train_sft(p.base, rows, self.cfg.trainer, self.render_cfg, out, self.seed, stage=stage)
            distributed.main_first(lambda: seal_dir(out, fingerprint))
            return stats()

        # every rank trains (DDP / FSDP); rank 0 verifies a cached model, the others then only read its stats
        entry = Entry(out, read, compute, Path(f"{out}.lock"), together=True, follow=stats)
        stats_, hit = self.runner.run(
            stage, f"SFT on {len(rows)} rows ({purpose})", key, entry,
            p.base, lambda params, s: {**training_cost(params, self.trainer_cfg, s), "rule": "training"})
        self.trainings.append({"purpose": purpose, "key": key, "cached": hit, **stats_})
        return trained_ref(f"{p.base.name}+{purpose}", out, key)

    # -- score (instructdiff.score_stage) -------------------------------------------------------------
    def score(self, ref: ModelRef, desc: str, variant: str = "conditioned") -> ScoreTable:
        """Response NLL / entropy of ``ref`` over the pool (``variant`` unconditioned: after an empty prompt)."""
        return self.need_scorer().score(ref, desc, variant)

    def signal(self, ref: ModelRef, name: str, rows: list[Row] | None = None, **options: Any) -> dict:
        """A registered signal of ``ref`` over the pool, or over ``rows`` (see ``PoolScorer.signal``)."""
        return self.need_scorer().signal(ref, name, rows, **options)

    def need_scorer(self) -> PoolScorer:
        if self.scorer is None:
            self.scorer = PoolScorer(self.cfg, self.cache, self.runner, self.store, self.need_prepared())
        return self.scorer

    # -- select --------------------------------------------------------------------------------------
    def context(self, selector: Selector | None = None) -> SelectionContext:
        """The cached stages a selector (or a training-row hook) may use."""
        p = self.need_prepared()
        return SelectionContext(
            pool=p.pool, response_tokens=p.response_tokens, rng=np.random.default_rng(self.seed),
            seed=self.seed, base=p.base, score=self.score,
            calibrate=lambda rows, purpose: self.train_model(rows, f"calibration-{purpose}", "calibrate"),
            train=lambda rows, purpose: self.train_model(rows, f"selection-{purpose}", "calibrate"),
            signal=self.signal, selector_model=self.need_scorer().selector_model(selector.model if selector else None),
            queries=lambda n=None: load_queries(self.cfg.domain, n), log=log.info,
        )

    def selection_key(self, selector: Selector) -> str:
        p, numerics = self.need_prepared(), self.need_scorer().numerics()
        return stable_hash({"pool": p.pool_fp, "base": p.base.fingerprint, "render": p.render_fp,
                            "selector": OmegaConf.to_container(self.cfg.selector, resolve=True),
                            "seed": self.seed, "v": STAGE_VERSIONS["select"], "response_end": self.response_end,
                            "trainer": self.trainer_key if selector.uses_training else None,
                            # bf16 or compiled scores are other numbers, so another selection; fp32 eager adds
                            # nothing to the key, so selections cached before this entry stay valid
                            **({"score": numerics} if numerics != {"dtype": "fp32"} else {}),
                            # a selector that matches against domain.query depends on those rows' content
                            **({"queries": fingerprint_rows(load_queries(self.cfg.domain))}
                               if selector.uses_queries else {})})

    def select(self, selector: Selector) -> Selection:
        p = self.need_prepared()
        key = self.selection_key(selector)
        path = self.cache / "selections" / f"{key}.json"
        fingerprint = {"key": key, "pool": p.pool_fp, "base": p.base.fingerprint}
        # no lock: the selector's own stages lock themselves, and a job that waited on another's whole
        # selection would never see (nor log) the calibration it shares. Every rank runs the selector: the
        # calibration and scoring it asks for are computed by all ranks together.
        entry = Entry(path, lambda: read_json(path, fingerprint, _check_selection_doc),
                      lambda: self._compute_selection(selector, path, fingerprint), None, together=True)
        doc, hit = self.runner.run("select", f"selection by {selector.name}", key, entry)
        if hit:
            self.runner.ledger.restore_selection(doc.get("cost"))
        return Selection(doc["selected"], doc["status"], doc["scores"], doc["stats"])

    def _compute_selection(self, selector: Selector, path: Path, fingerprint: dict) -> dict:
        from instructdiff.faults import crash_point

        ctx = self.context(selector)
        with self.runner.ledger.during_selection() as cost:
            # a handle the selector's uses_* flags do not declare raises: its key would miss what it read
            selection = selector.select(declared_context(ctx, selector))
        limit = selector.budget.limit(len(ctx.pool), ctx.pool_tokens)
        available = len(ctx.pool) if selector.budget.unit == "samples" else ctx.pool_tokens
        if limit > available:
            # not an error (budget.count=1000 on a small pool is a common sweep setting), but never silent
            note = (f"budget {limit} {selector.budget.unit} exceeds the pool's {available}: every row the "
                    f"selector kept is selected ({len(selection.selected)})")
            log.warning("[select] %s", note)
            selection.stats.setdefault("notes", []).append(note)
        crash_point("select.publish")
        doc = {"selected": selection.selected, "status": selection.status, "scores": selection.scores,
               "stats": selection.stats, "cost": cost}

        def publish() -> dict:
            write_json(path, doc, fingerprint, path.name, default=json_default)
            return doc

        # rank 0's selection for every rank: the final SFT's data-parallel shards must come from one row list
        return distributed.main_first(publish)

    # -- eval -----------------------------------------------------------------------------------------
    def evaluate(self, ref: ModelRef, label: str) -> dict:
        from instructdiff.evaluate import cached_evaluation

        eval_cfg = OmegaConf.to_container(self.cfg.eval, resolve=True)
        if self.need_prepared().renderer.template != "chat":
            # evaluate with the prompt format the model was trained on
            eval_cfg["apply_chat_template"] = False
        return cached_evaluation(self.runner, self.cache, ref, label, eval_cfg, device=self.cfg.score.device)

    # -- whole run -----------------------------------------------------------------------------------
    def prepare(self) -> Prepared:
        """Load and render the pool, resolve the base model: what every stage needs (``prepare_pool``)."""
        self.scorer = None
        self.prepared = prepare_pool(self.cfg, self.cache, self.render_cfg, self.pool_seed, self.runner.timer)
        if not self.prepared.pool:
            raise ValueError("every pool row was dropped; see the reasons above")
        return self.prepared

    def run(self) -> dict:
        cfg = self.cfg
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # before any data or model work: a typo in a selector key fails in a second
        with distributed.fail_together("making the selector"):
            selector: Selector = instantiate_selector(cfg.selector)
        if "eval" in self.stages:
            from instructdiff.evaluate import checked_eval_settings

            checked_eval_settings(self.cfg.eval)
        p = self.prepare()
        selecting = any(s in self.stages for s in ("calibrate", "score", "select", "train"))
        if selector.uses_budget and selecting:
            selector.budget.check_selects_something(len(p.pool), int(sum(p.response_tokens.values())))
        results: dict[str, Any] = {"run_dir": str(self.run_dir), "domain": cfg.domain.name,
                                   "model": p.base.name, "selector": selector.name,
                                   "seed": self.seed, "pool_seed": self.pool_seed, "stages": self.stages,
                                   # the model whose passes ranked the pool (a proxy for superfiltering)
                                   "scoring_model": self.need_scorer().selector_model(selector.model).name
                                   if selector.uses_models else None}
        selection = None
        if selecting:
            selection = self.select(selector)
            self._write_selection(selection, p.report.dropped + p.render_dropped, p.rows)
            results["selection"] = {**selection.stats, "n_pool": len(p.pool),
                                    "n_dropped_on_load": len(p.report.dropped),
                                    "n_dropped_by_renderer": len(p.render_dropped),
                                    "not_drawn": p.report.not_drawn,
                                    # every input row: the counts above are the selector's, of the rendered pool
                                    "accounting": self.accounting}
            results["selection"].pop("warmup_ids", None)
        trained = None
        if "train" in self.stages:
            by_id = {r.id: r for r in p.pool}
            train_rows = [by_id[i] for i in selection.selected]
            for flag, (selector_name, function) in TRAINING_ROW_HOOKS.items():
                if cfg.trainer.get(flag):
                    hook = _selector_module_function(selector_name, function)
                    train_rows, results[flag] = hook(train_rows, self.context(), cfg.domain)
            trained = self.train_model(train_rows, "final", "train")
        results["trainings"] = self.trainings
        if "eval" in self.stages:
            results["eval"] = {"base": self.evaluate(p.base, "base")}
            if trained is not None:
                results["eval"]["trained"] = self.evaluate(trained, "trained")
        results["seconds"] = self.runner.timer.seconds
        results["cost"] = self.runner.ledger.summary(self.runner.timer.seconds)
        events = self.runner.events
        results["cache"] = {"events": events, "score_store": self.store.stats(),
                            "hits": sum(e["hit"] for e in events), "misses": sum(not e["hit"] for e in events)}

        def publish() -> None:
            if records_same_work(self.run_dir / "results.json", results):
                log.info("every stage was a cache hit of work %s already records: kept that record (and its "
                         "manifest), with the times and costs of the run that computed it",
                         self.run_dir / "results.json")
                return
            write_run_file(self.run_dir / "results.json", results)
            write_manifest(self.run_dir, cfg, p, self.pool_seed, self.response_end, selection, self.accounting)

        distributed.main_first(publish)  # rank 0 alone writes the run directory; a failure there stops every rank
        return results

    def _write_selection(self, selection: Selection, load_dropped: list[dict], rows: list[Row]) -> None:
        """selection.jsonl and subset.jsonl (instructdiff.run_outputs.write_selection); keeps the accounting."""
        self.accounting = distributed.main_first(
            lambda: write_selection(self.run_dir, self.need_prepared(), selection, load_dropped, rows))


def prepare_pool(cfg: DictConfig, cache: Path, render_cfg: dict, pool_seed: int, timer: Timer) -> Prepared:
    """The pool as read and as rendered, and the base model, timed as the "data" stage.

    Every rank reads and renders for itself: a bad file or setting seen by one rank stops them all with its
    message (``fail_together``), so no collective may sit inside those blocks."""
    with timer.stage("data"):
        with distributed.fail_together("reading the pool"):
            rows, report = load_pool(cfg.domain, pool_seed)
        base = resolve_model(cfg.model, cache)  # built once, by rank 0 under a group (cache_check.serve)
        with distributed.fail_together("rendering the pool"):
            tokenizer = load_tokenizer(base)
            renderer = Renderer(tokenizer, **render_cfg)
            rendered, render_dropped = render_pool(renderer, rows)
    kept = {r.id for r in rendered}
    pool = [r for r in rows if r.id in kept]
    log.info(f"pool: {len(pool)} rows ({report.n_read} read, {len(report.dropped)} dropped on load, "
             f"{len(render_dropped)} dropped by the renderer)")
    return Prepared(rows, report, base, tokenizer, renderer, renderer.fingerprint, rendered, render_dropped, pool,
                    fingerprint_rows(pool), {r.id: r.n_completion for r in rendered})


def _check_selection_doc(doc: dict) -> None:
    """A selection cached before selections recorded a checksum: its parts must still fit together."""
    selected, status = doc["selected"], doc["status"]
    if not isinstance(doc["scores"], dict) or not isinstance(doc["stats"], dict):
        raise BadEntry(CORRUPT, "its scores or stats are not objects")
    if any(status.get(i) != "selected" for i in selected):
        raise BadEntry(CORRUPT, "a selected id is not marked selected")


def _selector_module_function(name: str, function: str) -> Any:
    """``function`` of the module that implements conf/selector/<name>.yaml's selector."""
    import importlib

    from instructdiff import CONF_DIR
    from instructdiff.selector_factory import current_target

    target = current_target(str(OmegaConf.load(CONF_DIR / "selector" / f"{name}.yaml")["_target_"]))
    return getattr(importlib.import_module(target.rpartition(".")[0]), function)


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.paths.get("run_dir"):
        return Path(cfg.paths.run_dir).resolve()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError("paths.run_dir is not set and no Hydra run is active")


def run(cfg: DictConfig) -> dict:
    """Run the configured stages; returns the results dict that is also written to results.json.

    Launched as several processes (torchrun, ``accelerate launch``, SLURM tasks) every rank calls this: they join
    one group here and leave it at the end, whatever happens in between (instructdiff.distributed)."""
    if distributed.launched_rank() != 0:
        logging.getLogger("instructdiff").setLevel(logging.WARNING)  # rank 0 speaks for the group
    distributed.init()
    try:
        return _run(cfg)
    finally:
        distributed.destroy()


def _run(cfg: DictConfig) -> dict:
    from instructdiff.atomic import ensure_dir
    from instructdiff.sweep import stage_metrics

    # rank 0's run directory for all: each rank's Hydra stamped its own (run.py sends the others' to a temporary
    # folder); made before W&B or any stage touches it, so an unwritable paths.run_dir fails in a second
    run_dir = distributed.main_first(lambda: ensure_dir(resolve_run_dir(cfg), "the run directory (paths.run_dir)"))
    with distributed.fail_together("setting up the run"):
        pipeline = Pipeline(cfg, run_dir)
    tracker = _tracker(cfg, run_dir)
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


def _tracker(cfg: DictConfig, run_dir: Path) -> Tracker:
    """The run's W&B tracker, made on rank 0 alone (one W&B run however many ranks); the others get logger none."""
    from instructdiff.sweep import tracker_identity

    held: list[Tracker] = []
    distributed.main_first(lambda: held.append(Tracker(cfg.get("logger"), run_dir, OmegaConf.to_container(
        cfg, resolve=True), **tracker_identity(cfg, run_dir))))
    return held[0] if held else Tracker(None, run_dir, {}, run_dir.name, None, [])
