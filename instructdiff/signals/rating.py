"""SelectIT rating probabilities (docs/methods.md §7): P(digit) for "1".."5" after each rating prompt, one forward each.

For every pool row and every rating instruction r_k the model reads

    r_k + "\\nInstruction:" + user_message(row) + "\\nResponse:" + response + "\\nThe answer is: "

(SelectIT's format; its code ends with ``"The answer is: \\n"``) and the full-vocabulary softmax at the last
position is read at the ids of the tokens "1".."5". The ids are looked up in the tokenizer (SelectIT hard-codes
Llama-2's 29896…29945); a digit that is not a single vocabulary token raises.

Options (part of the cache key):
  prompts: list of rating instructions (required; SelectIT's K)
  chat: false (default) — the text above as a plain prompt (tokenizer's special tokens, no chat template);
        true — the text up to the response as the user turn of the chat template, then the generation prompt
        and "The answer is: " as the start of the assistant turn.

Returns ``probs`` (N, n_prompts, 5) float64: raw softmax probabilities (not renormalised; the selector does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from instructdiff.render import user_message
from instructdiff.scoring import _decoder_and_head, _head_fp32, pad_right
from instructdiff.signals import SignalWork, all_tokens

DIGITS = ("1", "2", "3", "4", "5")
ANSWER_CUE = "The answer is: "
MAX_TOKENS_PER_BATCH = 4096
MAX_BATCH_SIZE = 32


def digit_token_ids(tokenizer, digits=DIGITS) -> list[int]:
    """Vocabulary id of each digit as one token; a clear error when a digit is not a single token."""
    ids = []
    for d in digits:
        enc = tokenizer(d, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            tid = int(enc[0])
        else:
            # SentencePiece tokenizers (Llama-2) prepend a word-boundary piece: "1" -> ["▁", "1"]; the bare
            # vocabulary entry is what follows "The answer is: " and what SelectIT reads.
            tid = tokenizer.convert_tokens_to_ids(d)
            if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
                raise ValueError(f"rating_probs: the digit {d!r} is not a single token of this tokenizer "
                                 f"(encodes to {enc}); SelectIT needs one token per score class")
            tid = int(tid)
        if tokenizer.decode([tid]).strip() != d:
            raise ValueError(f"rating_probs: token id {tid} decodes to {tokenizer.decode([tid])!r}, not {d!r}")
        ids.append(tid)
    if len(set(ids)) != len(ids):
        raise ValueError(f"rating_probs: digits {digits} map to repeated token ids {ids}")
    return ids


def rating_body(prompt: str, instruction: str, response: str) -> str:
    return f"{prompt}\nInstruction:{instruction}\nResponse:{response}\n"


def rating_ids(tokenizer, prompt: str, row, chat: bool = False) -> list[int]:
    """Token ids of one rating prompt for one row."""
    body = rating_body(prompt, user_message(row), row.response)
    if not chat:
        return list(tokenizer(body + ANSWER_CUE, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("rating_probs: chat=true needs a tokenizer with a chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": body.rstrip("\n")}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text + ANSWER_CUE, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def last_position_probs(model, sequences: list[list[int]], token_ids: list[int], pad_id: int) -> np.ndarray:
    """(len(sequences), len(token_ids)) full-softmax probabilities of ``token_ids`` after each sequence."""
    device = next(model.parameters()).device
    body, head = _decoder_and_head(model)
    out = np.zeros((len(sequences), len(token_ids)), dtype=np.float64)
    lengths = [len(s) for s in sequences]
    order = sorted(range(len(sequences)), key=lambda k: (lengths[k], k))
    batches: list[list[int]] = []
    for k in order:
        if batches and (len(batches[-1]) < MAX_BATCH_SIZE
                        and lengths[k] * (len(batches[-1]) + 1) <= MAX_TOKENS_PER_BATCH):
            batches[-1].append(k)
        else:
            batches.append([k])
    tid = torch.tensor(token_ids, device=device)
    for batch in tqdm(batches, desc="rating_probs", leave=False):
        ids, mask = pad_right([sequences[k] for k in batch], pad_id, device)
        last = torch.tensor([lengths[k] - 1 for k in batch], device=device)
        rows = torch.arange(len(batch), device=device)
        if body is not None:
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = _head_fp32(head, hidden[rows, last])
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[rows, last].float()
        probs = torch.softmax(logits.float(), dim=-1)[:, tid]
        out[batch] = probs.double().cpu().numpy()
    return out


def compute(inputs, options: dict) -> dict[str, np.ndarray]:
    prompts = list(options.get("prompts") or [])
    if not prompts:
        raise ValueError("rating_probs: options.prompts must list at least one rating instruction")
    chat = bool(options.get("chat", False))
    tok = inputs.tokenizer
    token_ids = digit_token_ids(tok, DIGITS)
    seqs = [rating_ids(tok, p, row, chat) for row in inputs.rows for p in prompts]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    probs = last_position_probs(inputs.model, seqs, token_ids, int(pad_id))
    return {"probs": probs.reshape(len(inputs.rows), len(prompts), len(DIGITS))}


def work(options: dict, rendered: Sequence[Any], params: Any) -> SignalWork:
    """One forward pass of every row per rating prompt; the prompt's own words are not counted."""
    k = len(options.get("prompts") or [None])
    t = all_tokens(rendered) * k
    return SignalWork(tokens=t, forward_tokens=t, rule=f"{k} forward passes (one per rating prompt)")
