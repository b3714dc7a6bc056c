"""Each signal declares its own passes beside its compute function (``work``); instructdiff.cost prices them.

The FLOPs below are worked out by hand from the rules in instructdiff/cost.py (forward 2·P·T, LoRA training
(4·P + 6·P_lora)·T·epochs), on the tiny model's shapes and hand-made rows.
"""

from __future__ import annotations

import importlib

import pytest

from instructdiff.cost import ModelParams, signal_cost
from instructdiff.render import Rendered
from instructdiff.signals import SIGNALS, SignalWork, signal_work

# the tiny model: 2 layers, q_proj 64→64, v_proj 64→32; LoRA r=8 on q_proj+v_proj: 8·(128 + 96)·2 = 3584
P = 106816
PARAMS = ModelParams(P, 32768, P, True, (("q_proj", 64, 64), ("v_proj", 64, 32)) * 2)
ROWS = [Rendered(f"x{k}", [1] * (5 + k), [2] * (3 + k)) for k in range(10)]  # 5+k prompt, 3+k response tokens
T_ALL = sum(8 + 2 * k for k in range(10))  # 170
T_PROMPT = sum(5 + k for k in range(10))  # 95


def test_every_registered_signal_declares_its_work() -> None:
    for name, where in SIGNALS.items():
        module = importlib.import_module(where.split(":")[0])
        assert callable(getattr(module, "work", None)), f"{module.__name__} declares no work() for signal {name}"


@pytest.mark.parametrize("name,options,tokens,flops,rule", [
    ("token_stats", {}, T_ALL, 2 * P * T_ALL, "forward over prompt + response"),
    ("rds_embedding", {"weighting": "position"}, T_ALL, 2 * P * T_ALL, "forward over prompt + response"),
    ("embedding", {"text": "full"}, T_ALL, 2 * P * T_ALL, "forward over prompt + response"),
    ("embedding", {"text": "prompt"}, T_PROMPT, 2 * P * T_PROMPT, "forward over prompts"),
    ("activations", {"tokens": "response"}, T_ALL, 2 * P * T_ALL, "forward over prompt + response"),
    ("activations", {"tokens": "prompt"}, T_PROMPT, 2 * P * T_PROMPT, "forward over prompts"),
    ("rating_probs", {"prompts": ["a", "b", "c"]}, 3 * T_ALL, 2 * P * 3 * T_ALL, "3 forward passes"),
    # 2 members × (3 epochs + 2 gradient passes) of LoRA training over every token
    ("lora_grad_norms", {"members": 2, "epochs": 3}, T_ALL, 2 * 5 * (4 * P + 6 * 3584) * T_ALL, "2 LoRA members"),
    ("sentence_embedding", {}, None, None, "not estimated"),
])
def test_signal_cost_by_hand(name, options, tokens, flops, rule) -> None:
    got = signal_cost(name, options, ROWS, PARAMS)
    assert got["tokens"] == tokens and got["rule"].startswith(rule)
    assert got["flops_uncached"] == (None if flops is None else pytest.approx(flops, rel=1e-12))


def test_scorestore_pass_is_one_forward_and_unknown_names_are_refused() -> None:
    assert signal_cost("response_stats", {}, ROWS, PARAMS)["flops_uncached"] == 2 * P * T_ALL
    with pytest.raises(KeyError, match="unknown signal 'no_such_signal'"):
        signal_cost("no_such_signal", {}, ROWS, PARAMS)


def test_work_is_counted_by_one_rule() -> None:
    """A signal's module declares passes, never FLOPs: the same work costs the same whoever declares it."""
    work = signal_work("lora_grad_norms", {"members": 1, "epochs": 1, "lora_r": 4}, ROWS, PARAMS)
    assert isinstance(work, SignalWork) and work.forward_tokens == 0 and work.other_flops == 0.0
    (training,) = work.trainings
    assert training == (T_ALL, 3, 4 * (128 + 96) * 2)
