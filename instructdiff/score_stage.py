"""The score stage of a run: scores (response NLL / entropy) and signals of any model over the run's pool, each
pass one cached ``StageRunner`` call over the ScoreStore."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from instructdiff import distributed
from instructdiff.models import ModelRef, load_model, load_tokenizer, resolve_model
from instructdiff.render import Renderer, render_pool
from instructdiff.rows import Row, fingerprint_rows
from instructdiff.score_store import ScoreStore
from instructdiff.scoring import ScoreTable
from instructdiff.stages import StageRunner

# signals built from per-token response NLL/entropy: they follow score.response_end
RESPONSE_END_SIGNALS = frozenset({"token_stats"})


class PoolScorer:
    """Model passes over one run's pool (``prepared``: instructdiff.pipeline.Prepared), computed once."""

    def __init__(self, cfg: DictConfig, cache: Path, runner: StageRunner, store: ScoreStore, prepared: Any) -> None:
        self.cfg, self.cache, self.runner, self.store, self.p = cfg, cache, runner, store, prepared
        self.seed = int(cfg.seed)
        self.response_end = str(cfg.score.get("response_end", "exclude"))
        self._renderers: dict[Any, Any] = {}
        self._selector_refs: dict[str, ModelRef] = {}

    def numerics(self) -> dict:
        """The scoring settings that change the numbers (and so the score and selection cache keys)."""
        return {"dtype": str(self.cfg.score.dtype), **({"compile": True} if self.cfg.score.get("compile") else {})}

    def score(self, ref: ModelRef, desc: str, variant: str = "conditioned") -> ScoreTable:
        from instructdiff.cost import signal_cost

        # Batching changes the float summation order only within 1e-6; keep it out of the key so
        # a different batch size reuses scores. A compiled body fuses ops (and under bf16 skips roundings),
        # so its tables are keyed apart; uncompiled keys stay what they were.
        key_settings = self.numerics()
        renderer, rendered, render_fp = self.renderer_for(ref)
        settings = {"max_tokens_per_batch": int(self.cfg.score.max_tokens_per_batch),
                    "max_batch_size": int(self.cfg.score.max_batch_size),
                    "checkpoint_every": int(self.cfg.score.checkpoint_every),
                    "pad_id": int(renderer.tokenizer.pad_token_id),
                    "dtype": key_settings["dtype"], "compile": "compile" in key_settings, "_key": key_settings}
        if variant == "unconditioned":
            by_id = {r.id: r for r in self.p.pool}
            cache_key = ("unconditioned", render_fp)
            if cache_key not in self._renderers:
                self._renderers[cache_key] = [renderer.unconditioned(by_id[r.id]) for r in rendered]
            rendered = self._renderers[cache_key]
        elif variant != "conditioned":
            raise ValueError(f"unknown scoring variant {variant!r}; expected conditioned | unconditioned")
        # end-of-turn tokens are trained on but, by default, not scored (score.response_end); the table's key
        # hashes every row's completion length, so the two choices never share a table
        rendered = [r.for_scoring(self.response_end) for r in rendered]
        desc = desc if variant == "conditioned" else f"{desc} ({variant})"
        entry = self.store.response_entry(lambda: load_model(ref, dtype="float32", device=self.cfg.score.device),
                                          ref.fingerprint, rendered, render_fp, settings, desc=f"score {desc}")
        if distributed.joined():
            # each rank scores its shard of the pool (ScoreStore), so every rank computes the table together
            # while rank 0 alone holds its lock for the group (cache_check.serve_in_group)
            entry = replace(entry, together=True, lock=Path(f"{entry.path}.lock"))
        # NLL / entropy: one forward pass over prompt + response of every row
        table, _ = self.runner.run("score", f"{desc} model scores", ref.fingerprint, entry, ref,
                                   lambda params, _: signal_cost("response_stats", {}, rendered, params),
                                   time_hits=True)
        return table

    def renderer_for(self, ref: ModelRef) -> tuple[Renderer, list, str]:
        """(renderer, rendered pool, render fingerprint) for a model's tokenizer; the base's when they match."""
        p = self.p
        if ref.fingerprint == p.base.fingerprint or ref.path.startswith(str(self.cache / "models" / "trained-")):
            return p.renderer, p.rendered, p.render_fp
        cached = self._renderers.get(ref.fingerprint)
        if cached is None:
            tok = load_tokenizer(ref)
            renderer = Renderer(tok, template=self.cfg.render.template, system_prompt=self.cfg.render.system_prompt,
                                max_length=None)
            by_id = {r.id: r for r in p.pool}
            cached = (renderer, [renderer(by_id[r.id]) for r in p.rendered], renderer.fingerprint)
            self._renderers[ref.fingerprint] = cached
        return cached

    def signal(self, ref: ModelRef, name: str, rows: list[Row] | None = None, **options: Any) -> dict:
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
        signal_rows, rows_fp = self.p.pool, self.p.pool_fp
        if rows is not None:
            rendered, _ = render_pool(renderer, rows)
            by_id = {r.id: r for r in rows}
            signal_rows = [by_id[r.id] for r in rendered]
            rows_fp = fingerprint_rows(signal_rows)

        def compute() -> dict:
            model = load_model(ref, dtype="float32", device=self.cfg.score.device)
            inputs = SignalInputs(model, renderer.tokenizer, renderer, signal_rows, rendered,
                                  next(model.parameters()).device, self.seed)
            out = fn(inputs, options)
            return out if rows is None else {**out, "ids": np.array([r.id for r in signal_rows], dtype=str)}

        what = f"{name} of {ref.name}" + ("" if rows is None else f" over {len(signal_rows)} given rows")
        # not sharded: under several processes rank 0 computes a signal alone while the others wait, then read it
        entry = self.store.arrays_entry(ref.fingerprint, rows_fp, render_fp, name, key_options, compute, what)
        out, _ = self.runner.run("score", what, entry.path.stem, entry, ref,
                                 lambda params, _: signal_cost(name, options, rendered, params), time_hits=True)
        return out

    def selector_model(self, name: str | None) -> ModelRef:
        """The model a selector scores with: conf/model/<name>.yaml, resolved once per run; None = the base."""
        if not name:
            return self.p.base
        if name not in self._selector_refs:  # asked for by the results and by the selection
            from instructdiff import CONF_DIR

            path = CONF_DIR / "model" / f"{name}.yaml"
            if not path.exists():
                known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
                raise ValueError(f"selector.model={name!r} is not a model config; known: {known}")
            self._selector_refs[name] = resolve_model(OmegaConf.load(path), self.cache)
        return self._selector_refs[name]
