"""``less_grads`` signal: LESS gradient features (Xia et al. 2024, arXiv 2402.04333; baselines/less.py, docs/less.md).

One call does the whole gradient side of LESS, so the warm-up is trained once for pool and query rows alike:

1. **Warm-up.** A LoRA adapter on the frozen model is trained on a seeded slice of the pool rows (``warmup_ids``:
   the ``max(warmup_min_rows, ⌊warmup_fraction·n⌋)`` rows with the smallest sha256(seed, id), a function of the
   pool's ids and the seed only, never of pool order or of other work) for ``epochs`` epochs of AdamW
   (β = (0.9, 0.999), ε = 1e-8, no weight decay, gradients clipped to ``max_grad_norm``, linear schedule with
   ⌈warmup_ratio·T⌉ warm-up steps over T steps, as the Hugging Face Trainer the reference uses). After epoch i
   the adapter θ_i, AdamW's moments (m_i = exp_avg, v_i = exp_avg_sq) and η_i, the mean learning rate of the
   epoch's steps, are kept: checkpoint i.
2. **Per-sample gradients** under each kept checkpoint, batch 1, LoRA dropout off, of the mean next-token loss
   over the row's completion tokens (the training loss, end-of-turn tokens included), w.r.t. the LoRA
   parameters, flattened in ``named_parameters`` order: g ∈ R^P.
   * pool rows, Adam-preconditioned (no bias correction, as the reference code):
       m' = β1·m_i + (1−β1)·g,  v' = β2·v_i + (1−β2)·g²,  Γ = m' / (√v' + ε)
     (``eps_in_sqrt: true``: Γ = m' / √(v' + ε), what ``obtain_gradients_with_adam`` of princeton-nlp/LESS does);
   * query rows (``query_ids``): g itself (SGD gradient).
3. **Random projection** Γ ↦ Rᵀ Γ with a Rademacher matrix R ∈ {±1/√d}^{P×d} (``RademacherProjector``),
   generated block by block (1,024 rows of R at a time) from (projection_seed, block index): the full P×d matrix
   is never held, every row and checkpoint meets the same matrix, and at most ``projection_buffer`` per-sample
   gradients are buffered between projections. ``projection_dim: null`` skips the projection (tests; tiny
   models only). The projected vector is L2-normalised; a non-finite or zero vector becomes NaN.

Options (all part of the ScoreStore key; defaults in ``DEFAULTS``): seed (null = ``inputs.seed``; the selector
passes the run's seed because the store's key holds no seed), query_ids, warmup_fraction, warmup_min_rows,
epochs, checkpoints (epochs whose checkpoint is used; null = all), batch_size, learning_rate, warmup_ratio,
max_grad_norm, lora_r, lora_alpha, lora_dropout, target_modules (null = ``detect_target_modules``),
projection_dim, projection_seed, projection_buffer, eps_in_sqrt.

Returns, first axis = ``inputs.rows`` (the pipeline adds ``ids`` for a ``rows=`` call): ``features`` float32
(M, C, d), unit rows per checkpoint; ``feature_norm`` float32 (M, C), ‖Γ‖ or ‖g‖ before projection; ``loss``
float32 (M, C); ``is_query`` bool (M,); ``in_warmup`` bool (M,); ``checkpoint_lr`` float64 (M, C), η of every
kept checkpoint (the same on every row: repeated so that axis 0 stays the row axis); ``checkpoint_epoch``
int64 (M, C). The adapters are removed afterwards (``unload``): the model is left as given.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from instructdiff.scoring import _decoder_and_head
from instructdiff.signals import SignalWork, Training, all_tokens
from instructdiff.signals.lora_grads import attention_targets, detect_target_modules

ADAM_BETAS = (0.9, 0.999)  # AdamW's defaults, the reference's adamw_torch and its hard-coded β1, β2
ADAM_EPS = 1e-8
PROJECTION_BLOCK_ROWS = 1024  # rows of R generated at a time; part of R's definition (seeded per block)

DEFAULTS: dict[str, Any] = {
    "seed": None, "query_ids": [], "warmup_fraction": 0.05, "warmup_min_rows": 4, "epochs": 4,
    "checkpoints": None, "batch_size": 1, "learning_rate": 2e-5, "warmup_ratio": 0.03, "max_grad_norm": 1.0,
    "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": None, "projection_dim": 8192,
    "projection_seed": 0, "projection_buffer": 64, "eps_in_sqrt": False,
}


def resolve_options(options: dict) -> dict[str, Any]:
    """``options`` over ``DEFAULTS``, validated; unknown keys are an error (a typo would silently change nothing)."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"less_grads: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    o["query_ids"] = [str(i) for i in (o["query_ids"] or [])]
    for key in ("warmup_min_rows", "epochs", "batch_size", "lora_r", "projection_seed", "projection_buffer"):
        o[key] = int(o[key])
    for key in ("warmup_fraction", "learning_rate", "warmup_ratio", "lora_alpha", "lora_dropout"):
        o[key] = float(o[key])
    if o["epochs"] < 1 or o["batch_size"] < 1 or o["lora_r"] < 1 or o["projection_buffer"] < 1:
        raise ValueError("less_grads: epochs, batch_size, lora_r and projection_buffer must be >= 1")
    if not 0.0 <= o["warmup_fraction"] <= 1.0 or o["warmup_min_rows"] < 0:
        raise ValueError(f"less_grads: warmup_fraction must be in [0, 1] and warmup_min_rows >= 0, got "
                         f"{o['warmup_fraction']}, {o['warmup_min_rows']}")
    if not 0.0 <= o["warmup_ratio"] < 1.0 or o["learning_rate"] <= 0:
        raise ValueError(f"less_grads: need 0 <= warmup_ratio < 1 and learning_rate > 0, got "
                         f"{o['warmup_ratio']}, {o['learning_rate']}")
    epochs = list(range(1, o["epochs"] + 1))
    ckpts = epochs if o["checkpoints"] is None else sorted({int(e) for e in o["checkpoints"]})
    if not ckpts or any(e not in epochs for e in ckpts):
        raise ValueError(f"less_grads: checkpoints must be epochs in 1..{o['epochs']}, got {o['checkpoints']}")
    o["checkpoints"] = None if o["checkpoints"] is None else ckpts
    o["kept_epochs"] = ckpts
    if o["projection_dim"] is not None:
        o["projection_dim"] = int(o["projection_dim"])
        if o["projection_dim"] < 8 or o["projection_dim"] % 8:
            raise ValueError(f"less_grads: projection_dim must be a multiple of 8 (>= 8) or null, got "
                             f"{o['projection_dim']}")
    o["max_grad_norm"] = None if not o["max_grad_norm"] else float(o["max_grad_norm"])
    o["eps_in_sqrt"] = bool(o["eps_in_sqrt"])
    if o["seed"] is not None:
        o["seed"] = int(o["seed"])
    return o


# -------------------------------------------------------------------------------------------------- warm-up slice
def warmup_ids(ids: Sequence[str], seed: int, fraction: float, min_rows: int) -> list[str]:
    """The warm-up slice: the k = max(min_rows, ⌊fraction·n⌋) ids (at most n) with the smallest sha256(seed, id),
    in the order of ``ids``. A function of the set of ids and the seed only (not of order or of other RNG use)."""
    n = len(ids)
    k = min(n, max(int(min_rows), int(math.floor(round(float(fraction) * n, 6)))))
    if k < 1:
        raise ValueError(f"less_grads: the warm-up slice is empty ({n} candidate pool rows, warmup_fraction="
                         f"{fraction}, warmup_min_rows={min_rows}); LESS needs a warm-up: raise "
                         "selector.warmup_fraction or selector.warmup_min_rows, or give it a pool")

    def rank(i: str) -> str:
        return hashlib.sha256(f"less-warmup\0{int(seed)}\0{i}".encode()).hexdigest()

    # nsmallest is sorted(ids, key)[:k] (its documented equivalence) holding k keys, not one per pool row
    chosen = set(heapq.nsmallest(k, ids, key=lambda i: (rank(i), i)))
    return [i for i in ids if i in chosen]


def warmup_rows(rendered: Sequence[Any], o: dict) -> list[Any]:
    """The rendered rows of the warm-up slice: drawn from the non-query rows with ``o["seed"]``."""
    if o.get("seed") is None:
        raise ValueError("less_grads: no seed for the warm-up slice")
    queries = set(o["query_ids"])
    candidates = [r for r in rendered if r.id not in queries]
    chosen = set(warmup_ids([r.id for r in candidates], o["seed"], o["warmup_fraction"], o["warmup_min_rows"]))
    return [r for r in candidates if r.id in chosen]


def linear_schedule(total_steps: int, warmup_ratio: float, lr: float) -> np.ndarray:
    """Learning rate of each optimiser step: Hugging Face's linear schedule with ⌈ratio·T⌉ warm-up steps
    (step s < W: lr·s/W, so the first step has lr 0; then lr·(T − s)/(T − W))."""
    warm = math.ceil(total_steps * warmup_ratio)
    s = np.arange(total_steps, dtype=np.float64)
    up = s / max(1, warm)
    down = np.maximum(0.0, (total_steps - s) / max(1, total_steps - warm))
    return float(lr) * np.where(s < warm, up, down)


# ------------------------------------------------------------------------------------------ Adam preconditioning
def adam_precondition(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      eps_in_sqrt: bool = False) -> torch.Tensor:
    """Γ = m'/(√v' + ε), m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g² (no bias correction); eps_in_sqrt: m'/√(v' + ε)."""
    b1, b2 = ADAM_BETAS
    m = b1 * exp_avg + (1 - b1) * g
    v = b2 * exp_avg_sq + (1 - b2) * g * g
    return m / (torch.sqrt(v + ADAM_EPS) if eps_in_sqrt else torch.sqrt(v) + ADAM_EPS)


# ------------------------------------------------------------------------------------------------ the projection
_SIGNS = (np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1)  # byte → 8 ±1


class RademacherProjector:
    """x ↦ Rᵀx for R ∈ {±1/√d}^{P×d}, E[⟨Rᵀx, Rᵀy⟩] = ⟨x, y⟩ (Johnson–Lindenstrauss).

    R is never materialised: block b (rows b·B … of R, B = ``block_rows``) is regenerated on demand from the
    PCG64 raw stream seeded by SeedSequence([seed, b]) — one bit per entry, a stream NumPy keeps stable across
    versions — so any block, any sample and any call sees the same matrix. Memory: one B × d block."""

    def __init__(self, n_params: int, dim: int, seed: int = 0, block_rows: int = PROJECTION_BLOCK_ROWS) -> None:
        if dim < 8 or dim % 8:
            raise ValueError(f"projection dim must be a positive multiple of 8, got {dim}")
        self.n_params, self.dim, self.seed, self.block_rows = int(n_params), int(dim), int(seed), int(block_rows)
        self._buf = np.empty((min(self.block_rows, self.n_params), self.dim // 8, 8), dtype=np.float32)

    @property
    def n_blocks(self) -> int:
        return -(-self.n_params // self.block_rows)

    def block(self, b: int) -> torch.Tensor:
        """Rows [b·B, min(P, (b+1)·B)) of √d·R: a (rows, d) float32 tensor of ±1."""
        return self._block(b).clone()

    def _block(self, b: int) -> torch.Tensor:
        """``block(b)`` as a view of a buffer that the next call overwrites (no copy: ``project``'s inner loop)."""
        rows = min(self.block_rows, self.n_params - b * self.block_rows)
        if rows <= 0:
            raise IndexError(f"block {b} is past the {self.n_blocks} blocks of a {self.n_params}-row matrix")
        n_bytes = rows * self.dim // 8
        raw = np.random.PCG64(np.random.SeedSequence([self.seed, b])).random_raw(-(-n_bytes // 8))
        bits = raw.astype("<u8", copy=False).view(np.uint8)[:n_bytes].reshape(rows, self.dim // 8)
        out = self._buf[:rows]
        np.take(_SIGNS, bits, axis=0, out=out)
        return torch.from_numpy(out.reshape(rows, self.dim))

    def matrix(self) -> torch.Tensor:
        """The whole (P, d) float64 R, blocks stacked (tests and small P only)."""
        return torch.cat([self._block(b).double() for b in range(self.n_blocks)]) / math.sqrt(self.dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(k, P) → (k, d) float64 Rᵀx, accumulated block by block in float64."""
        if x.ndim != 2 or x.shape[1] != self.n_params:
            raise ValueError(f"expected (k, {self.n_params}) gradients, got {tuple(x.shape)}")
        acc = torch.zeros((x.shape[0], self.dim), dtype=torch.float64, device=x.device)
        for b in range(self.n_blocks):
            lo = b * self.block_rows
            r = self._block(b).to(device=x.device, dtype=x.dtype)
            acc += (x[:, lo: lo + r.shape[0]] @ r).double()
        return acc * (1.0 / math.sqrt(self.dim))


def unit_rows(y: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm 1; a non-finite or zero row becomes NaN (it has no direction)."""
    norm = y.norm(dim=1, keepdim=True)
    ok = torch.isfinite(norm) & (norm > 0)
    return torch.where(ok, y / torch.where(ok, norm, torch.ones_like(norm)), torch.full_like(y, float("nan")))


# ----------------------------------------------------------------------------------------------- model passes
def sample_loss(model: Any, r: Any, device: Any) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens of one rendered row (batch 1, no padding); the
    vocabulary projection runs on the positions that predict completion tokens only."""
    ids = torch.tensor([r.token_ids], dtype=torch.long, device=device)
    start = max(1, r.n_prompt)  # the first token has no prediction
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel wraps the HF model
    body, head = _decoder_and_head(hf)
    if body is not None:
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, start - 1: -1]
        logits = head(hidden).float()
    else:
        logits = hf(input_ids=ids, use_cache=False).logits[:, start - 1: -1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[0, start:])


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """∇_params loss, flattened and concatenated in ``params`` order (float32, (P,))."""
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads]).float()


@dataclass
class Checkpoint:
    """The warm-up state after one epoch: adapter values, AdamW's moments (flat, ``params`` order) and η."""

    epoch: int
    lr: float              # η_i: mean learning rate of the epoch's optimiser steps
    steps: int             # optimiser steps taken so far
    weights: list[torch.Tensor]
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


@contextmanager
def lora_adapters(model: Any, o: dict, seed: int) -> Iterator[tuple[Any, list[torch.Tensor]]]:
    """(peft model, trainable LoRA parameters in ``named_parameters`` order) on the frozen ``model``; the adapter
    is initialised under ``torch.manual_seed(seed)`` and removed on exit."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    targets = list(o["target_modules"] or detect_target_modules(model))
    config = LoraConfig(r=o["lora_r"], lora_alpha=o["lora_alpha"], lora_dropout=o["lora_dropout"],
                        target_modules=targets, bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out="c_attn" in targets)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    try:
        params = [p for _, p in peft_model.named_parameters() if p.requires_grad]
        yield peft_model, params
    finally:
        peft_model.unload()


def warm_up(peft_model: Any, params: list[torch.Tensor], rendered: list, o: dict, seed: int, device: Any,
            bar: Any = None) -> list[Checkpoint]:
    """Train the adapter on ``rendered`` (the warm-up slice); return the checkpoints of ``o["kept_epochs"]``.

    Batches are averages of per-sample losses (batch-1 passes with accumulation, as the reference's batch 1 ×
    gradient accumulation); the data order of each epoch is a seeded permutation of the slice sorted by id."""
    k, bs = len(rendered), o["batch_size"]
    steps_per_epoch = -(-k // bs)
    lrs = linear_schedule(o["epochs"] * steps_per_epoch, o["warmup_ratio"], o["learning_rate"])
    optimizer = torch.optim.AdamW(params, lr=float(lrs[0]), betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
    dropouts = [m for n, m in peft_model.named_modules() if "lora_dropout" in n]
    by_id = sorted(rendered, key=lambda r: r.id)
    order_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    kept: list[Checkpoint] = []
    step = 0
    for epoch in range(1, o["epochs"] + 1):
        perm = order_rng.permutation(k)
        for m in dropouts:  # the base model stays in eval mode; only the adapter's dropout trains
            m.train()
        for s in range(0, k, bs):
            batch = [by_id[j] for j in perm[s: s + bs]]
            optimizer.zero_grad(set_to_none=True)
            for r in batch:
                (sample_loss(peft_model, r, device) / len(batch)).backward()
                if bar is not None:
                    bar.update(1)
            if o["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(params, o["max_grad_norm"])
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[step])
            optimizer.step()
            step += 1
        peft_model.eval()
        if epoch in o["kept_epochs"]:
            state = [optimizer.state[p] for p in params]
            kept.append(Checkpoint(
                epoch=epoch, lr=float(lrs[(epoch - 1) * steps_per_epoch: epoch * steps_per_epoch].mean()),
                steps=step, weights=[p.detach().clone() for p in params],
                exp_avg=torch.cat([st["exp_avg"].reshape(-1) for st in state]).detach().clone(),
                exp_avg_sq=torch.cat([st["exp_avg_sq"].reshape(-1) for st in state]).detach().clone()))
    optimizer.zero_grad(set_to_none=True)
    return kept


def gradient_features(peft_model: Any, params: list[torch.Tensor], rendered: list, is_query: np.ndarray,
                      checkpoints: list[Checkpoint], o: dict, device: Any, bar: Any = None) -> dict[str, np.ndarray]:
    """Projected, unit-normalised gradient features of every row under every checkpoint (module docstring §2–3)."""
    n_rows, n_ckpt = len(rendered), len(checkpoints)
    n_params = int(sum(p.numel() for p in params))
    projector = None if o["projection_dim"] is None else RademacherProjector(n_params, o["projection_dim"],
                                                                             o["projection_seed"])
    dim = n_params if projector is None else o["projection_dim"]
    features = np.full((n_rows, n_ckpt, dim), np.nan, dtype=np.float32)
    norms = np.full((n_rows, n_ckpt), np.nan, dtype=np.float32)
    losses = np.full((n_rows, n_ckpt), np.nan, dtype=np.float32)
    buffer = torch.empty((min(o["projection_buffer"], n_rows * n_ckpt), n_params), dtype=torch.float32,
                         device=device)
    slots: list[tuple[int, int]] = []

    def flush() -> None:
        if slots:
            x = buffer[: len(slots)]
            y = unit_rows(x.double() if projector is None else projector.project(x)).float().cpu().numpy()
            for s, (j, c) in enumerate(slots):
                features[j, c] = y[s]
            slots.clear()

    peft_model.eval()  # LoRA dropout off: the features are deterministic
    for c, ck in enumerate(checkpoints):
        with torch.no_grad():
            for p, w in zip(params, ck.weights, strict=True):
                p.copy_(w)
        m, v = ck.exp_avg.to(device), ck.exp_avg_sq.to(device)
        for j, r in enumerate(rendered):
            loss = sample_loss(peft_model, r, device)
            g = flat_grad(loss, params)
            feat = g if is_query[j] else adam_precondition(g, m, v, o["eps_in_sqrt"])
            losses[j, c], norms[j, c] = float(loss.detach()), float(feat.double().norm())
            if bar is not None:
                bar.update(1)
            if not np.isfinite(norms[j, c]):
                continue  # a non-finite gradient stays NaN: the selector drops the row, never ranks it
            buffer[len(slots)] = feat
            slots.append((j, c))
            if len(slots) == buffer.shape[0]:
                flush()
    flush()
    return {"features": features, "feature_norm": norms, "loss": losses}


@contextmanager
def warmed_up(inputs: Any, options: dict, bar: Any = None) -> Iterator[dict[str, Any]]:
    """The warm-up of ``compute``, reusable: yields {peft_model, params, checkpoints, options, warm} with the
    adapter still attached (at the last epoch's weights); removed on exit. Deterministic given the options and
    the seed (LoRA init and dropout under a seed derived from it; global RNG state restored afterwards)."""
    o = resolve_options(options)
    o["seed"] = int(inputs.seed if o["seed"] is None else o["seed"])
    warm = warmup_rows(inputs.rendered, o)
    device = inputs.device
    fork = [device] if torch.device(device).type == "cuda" else []
    lora_seed = int(np.random.SeedSequence([o["seed"], 0]).generate_state(1)[0])
    with torch.random.fork_rng(devices=fork), lora_adapters(inputs.model, o, lora_seed) as (peft_model, params):
        if bar is not None:
            bar.set_postfix_str(f"warm-up on {len(warm)} rows")
        checkpoints = warm_up(peft_model, params, warm, o, o["seed"], device, bar)
        yield {"peft_model": peft_model, "params": params, "checkpoints": checkpoints, "options": o, "warm": warm}


def compute(inputs: Any, options: dict) -> dict[str, np.ndarray]:
    o = resolve_options(options)
    rendered = inputs.rendered
    if len(rendered) != len(inputs.rows) or any(r.id != row.id for r, row in zip(rendered, inputs.rows, strict=False)):
        raise ValueError("less_grads: rendered rows and rows are not aligned")
    queries = set(o["query_ids"])
    is_query = np.array([r.id in queries for r in rendered], dtype=bool)
    n_warm = len(warmup_rows(rendered, {**o, "seed": int(inputs.seed if o["seed"] is None else o["seed"])}))
    n_ckpt = len(o["kept_epochs"])
    bar = tqdm(total=o["epochs"] * n_warm + n_ckpt * len(rendered), desc="less_grads", unit="sample",
               dynamic_ncols=True)
    try:
        with warmed_up(inputs, options, bar) as w:
            bar.set_postfix_str(f"gradients under {n_ckpt} checkpoints")
            out = gradient_features(w["peft_model"], w["params"], rendered, is_query, w["checkpoints"],
                                    w["options"], inputs.device, bar)
            warm_ids = {r.id for r in w["warm"]}
            ckpts = w["checkpoints"]
    finally:
        bar.close()
    n = len(rendered)
    return {**out, "is_query": is_query, "in_warmup": np.array([r.id in warm_ids for r in rendered], dtype=bool),
            "checkpoint_lr": np.tile(np.array([ck.lr for ck in ckpts], dtype=np.float64), (n, 1)),
            "checkpoint_epoch": np.tile(np.array([ck.epoch for ck in ckpts], dtype=np.int64), (n, 1))}


def work(options: dict, rendered: Sequence[Any], params: Any) -> SignalWork:
    """The LoRA warm-up on its seeded slice, then under each kept checkpoint one gradient pass of every row (pool
    and queries) and its projection to d dims (a P_lora × d matmul, 2·P_lora·d per row). Raises without a seed
    in ``options``: the slice, and so the warm-up's tokens, depend on it."""
    o = resolve_options(options)
    p_lora = params.lora(o["lora_r"], list(o["target_modules"] or attention_targets({n for n, _, _ in params.linears})))
    warm, n_ckpt = warmup_rows(rendered, o), len(o["kept_epochs"])
    return SignalWork(
        tokens=all_tokens(rendered),
        trainings=(Training(all_tokens(warm), o["epochs"], p_lora), Training(all_tokens(rendered), n_ckpt, p_lora)),
        other_flops=n_ckpt * len(rendered) * 2.0 * p_lora * (o["projection_dim"] or 0),
        rule=f"LoRA warm-up ({o['epochs']} epochs × {len(warm)} rows) + {n_ckpt} checkpoints × "
             f"(gradient pass + projection) of {len(rendered)} rows")
