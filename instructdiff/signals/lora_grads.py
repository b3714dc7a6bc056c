"""``lora_grad_norms`` signal: per-example LoRA gradient norms of an ensemble, early and late (docs/methods.md §5).

GradFiltering (arXiv 2601.13697) trains M independent LoRA adapters on a frozen proxy model over the whole
pool (different seeds and data orders) and records, for every sample i, the norm of its loss gradient w.r.t.
each member's LoRA parameters at an early epoch e1 and a late epoch e2:

    n_i^(m,e) = || ∇_{Δθ^(m)} L(x_i) ||_2 ,   L = mean token cross-entropy over the response tokens of x_i.

**[recon]** (no code published): M, E, e1/e2, the LoRA rank/targets, the optimiser and the learning rate are
unknown; the defaults below are docs/methods.md §5.2's suggestions and all of them are options (part of the cache key):

  members         M = 4 adapters; member m is seeded with SeedSequence([seed, m]) (LoRA init and data order)
  epochs          E = 3 epochs of AdamW over the pool (no schedule, no weight decay) for each member
  early_epoch     e1 = 1; norms taken after epoch e1's last optimiser step
  late_epoch      e2 = null → E
  lora_r / lora_alpha / lora_dropout   8 / 16 / 0.0
  target_modules  null = the attention projections the model has (q_proj+v_proj for Llama/Qwen/Mistral,
                  c_attn for GPT-2, query_key_value for GPT-NeoX/Falcon), or a list of module names
  learning_rate   1e-4
  batch_size      8 (training batches; padding masked out; batch loss = mean over the batch's response tokens)

Training uses response-token loss only (labels −100 on prompt tokens and padding). The frozen proxy stays in
eval mode (its own dropout off; ``lora_dropout`` acts only in the training steps), so the per-example passes
— batch 1, backward, no optimiser step — are deterministic given the seed. The adapters are removed again
afterwards (``unload``), leaving the model as given (its parameters frozen).

Returns, in pool order: ``grad_norms`` float32 (N, M, 2) — [..., 0] at e1, [..., 1] at e2 — and ``losses``
float32 (N, M, 2), the per-example loss of the same passes. (Pool order on axis 0 is the signal protocol; the
GradFiltering selector transposes to (M, 2, N).)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from instructdiff.signals import SignalWork, Training, all_tokens

#: (module names that must all exist, LoRA target list), in order of preference
ATTENTION_TARGETS = ((("q_proj", "v_proj"), ["q_proj", "v_proj"]), (("c_attn",), ["c_attn"]),
                     (("query_key_value",), ["query_key_value"]), (("Wqkv",), ["Wqkv"]))


def detect_target_modules(model: Any) -> list[str]:
    """The attention projections present in ``model`` (LoRA targets), by module-name suffix."""
    return attention_targets({n.rsplit(".", 1)[-1] for n, _ in model.named_modules()})


def attention_targets(leaf_names: set[str]) -> list[str]:
    """The LoRA targets among a model's leaf module names (``detect_target_modules`` for a loaded model, the cost
    estimate for a model's parameter shapes)."""
    for needed, targets in ATTENTION_TARGETS:
        if all(x in leaf_names for x in needed):
            return list(targets)
    raise ValueError("no known attention projection (q_proj/v_proj, c_attn, query_key_value, Wqkv) found; "
                     "set the signal option target_modules")


def member_seed(seed: int, member: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(member)]).generate_state(1)[0])


def collate(rendered: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask, labels); labels are −100 on prompt tokens and padding."""
    width = max(r.n_tokens for r in rendered)
    ids = torch.full((len(rendered), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rendered), width), dtype=torch.long)
    labels = torch.full((len(rendered), width), -100, dtype=torch.long)
    for b, r in enumerate(rendered):
        seq = torch.tensor(r.token_ids)
        ids[b, : len(seq)] = seq
        mask[b, : len(seq)] = 1
        labels[b, r.n_prompt: len(seq)] = seq[r.n_prompt:]
    return ids, mask, labels


def response_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every response token of the batch (logits at t predict t+1)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)


def per_example_norms(model: Any, params: list[torch.Tensor], rendered: list, pad_id: int,
                      device: Any) -> tuple[np.ndarray, np.ndarray]:
    """(||∇_params L(x_i)||_2, L(x_i)) for every sample: batch 1, one backward each, no optimiser step."""
    norms = np.zeros(len(rendered), dtype=np.float64)
    losses = np.zeros(len(rendered), dtype=np.float64)
    for i, r in enumerate(rendered):
        for p in params:
            p.grad = None
        ids, mask, labels = (t.to(device) for t in collate([r], pad_id))
        loss = response_loss(model, ids, mask, labels)
        loss.backward()
        sq = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
        norms[i], losses[i] = np.sqrt(sq), float(loss.detach())
    for p in params:
        p.grad = None
    return norms, losses


def compute(inputs: Any, options: dict) -> dict[str, np.ndarray]:
    from peft import LoraConfig, get_peft_model

    members = int(options.get("members", 4))
    epochs = int(options.get("epochs", 3))
    e1 = int(options.get("early_epoch", 1))
    e2 = int(options.get("late_epoch") or epochs)
    if members < 1 or epochs < 1:
        raise ValueError(f"lora_grad_norms: members and epochs must be >= 1, got {members}, {epochs}")
    if not 1 <= e1 < e2 <= epochs:
        raise ValueError(f"lora_grad_norms: need 1 <= early_epoch < late_epoch <= epochs, got {e1}, {e2}, {epochs}")
    batch_size = int(options.get("batch_size", 8))
    lr = float(options.get("learning_rate", 1e-4))
    model, rendered, device = inputs.model, inputs.rendered, inputs.device
    targets = list(options.get("target_modules") or detect_target_modules(model))
    pad_id = inputs.tokenizer.pad_token_id if inputs.tokenizer.pad_token_id is not None else 0
    n = len(rendered)
    norms = np.zeros((n, members, 2), dtype=np.float32)
    losses = np.zeros((n, members, 2), dtype=np.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    fork = [device] if torch.device(device).type == "cuda" else []
    bar = tqdm(total=members * (epochs * n + 2 * n), desc="lora_grad_norms", unit="sample", dynamic_ncols=True)
    with torch.random.fork_rng(devices=fork):
        for m in range(members):
            seed = member_seed(inputs.seed, m)
            torch.manual_seed(seed)
            config = LoraConfig(r=int(options.get("lora_r", 8)), lora_alpha=int(options.get("lora_alpha", 16)),
                                lora_dropout=float(options.get("lora_dropout", 0.0)), target_modules=targets,
                                bias="none", task_type="CAUSAL_LM", fan_in_fan_out="c_attn" in targets)
            peft_model = get_peft_model(model, config)
            lora_dropouts = [mod for name, mod in peft_model.named_modules() if "lora_dropout" in name]
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            order_rng = np.random.default_rng(seed)
            try:
                for epoch in range(1, epochs + 1):
                    perm = order_rng.permutation(n)
                    for mod in lora_dropouts:  # the base stays in eval mode; only LoRA dropout trains
                        mod.train()
                    for s in range(0, n, batch_size):
                        batch = [rendered[k] for k in perm[s: s + batch_size]]
                        ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
                        optimizer.zero_grad(set_to_none=True)
                        response_loss(peft_model, ids, mask, labels).backward()
                        optimizer.step()
                        bar.update(len(batch))
                    peft_model.eval()
                    for slot, e in enumerate((e1, e2)):
                        if epoch == e:
                            nv, lv = per_example_norms(peft_model, params, rendered, pad_id, device)
                            norms[:, m, slot], losses[:, m, slot] = nv, lv
                            bar.update(n)
            finally:
                model = peft_model.unload()
    bar.close()
    return {"grad_norms": norms, "losses": losses}


def work(options: dict, rendered: Sequence[Any], params: Any) -> SignalWork:
    """Each member trains ``epochs`` epochs over the rows, then takes a gradient of every row twice (early and
    late): (epochs + 2) LoRA forward + backward passes over all tokens per member."""
    members, epochs = int(options.get("members", 4)), int(options.get("epochs", 3))
    targets = options.get("target_modules") or attention_targets({name for name, _, _ in params.linears})
    p_lora = params.lora(int(options.get("lora_r", 8)), list(targets))
    t = all_tokens(rendered)
    return SignalWork(tokens=t, trainings=(Training(t, members * (epochs + 2), p_lora),),
                      rule=f"{members} LoRA members × ({epochs} epochs + 2 gradient passes)")
