"""Smoke test of scripts/bench_scoring.py on the tiny model: runs end to end, JSON keys, fp32 fidelity."""

from __future__ import annotations

import importlib.util
import json

import pytest

from instructdiff import PROJECT_ROOT

KEYS = {
    "n_samples", "n_tokens", "loop_tok_s", "engine_fp32_tok_s", "engine_bf16_tok_s", "speedup_fp32",
    "speedup_bf16", "peak_flops_fp32", "peak_flops_bf16", "frac_peak_loop", "frac_peak_fp32", "frac_peak_bf16",
    "max_abs_diff_nll_fp32", "max_abs_diff_entropy_fp32", "max_abs_diff_nll_bf16", "max_abs_diff_entropy_bf16",
    "spearman_nll_bf16", "spearman_entropy_bf16", "spearman_dH_fp32", "spearman_dH_bf16",
    "top10_overlap_dH_fp32", "top10_overlap_dH_bf16", "targets_met", "device", "torch_threads",
}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scoring", PROJECT_ROOT / "scripts" / "bench_scoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_scoring_tiny(tiny_model_cache, capsys):
    result = _bench().main(["--model", "tiny", "--n", "8", "--device", "cpu", "--cache-dir", str(tiny_model_cache),
                            "--tune-steps", "2", "--tune-lr", "3e-3", "--rounds", "2", "--warmup-samples", "2",
                            "--peak-seconds", "0.1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    assert KEYS <= result.keys()
    assert result["n_samples"] == 8 and result["n_tokens"] > 0
    assert result["max_abs_diff_nll_fp32"] <= 1e-4
    assert result["max_abs_diff_entropy_fp32"] <= 1e-4
    assert result["targets_met"]["fp32_max_abs_diff_le_1e-4"] is True
    for k in ("loop_tok_s", "engine_fp32_tok_s", "engine_bf16_tok_s", "peak_flops_fp32", "peak_flops_bf16"):
        assert result[k] > 0
    assert set(result["targets_met"]) >= {"fp32_speedup_ge_1.5", "bf16_speedup_ge_3", "bf16_spearman_nll_ge_0.99",
                                          "bf16_spearman_entropy_ge_0.99", "bf16_top10_overlap_dH_ge_0.9"}


@pytest.mark.slow
def test_bench_compiled_paths_and_bf16_error_sources(tiny_model_cache, capsys):
    """--compile adds the compiled fp32/bf16 paths with their own figures (fp32 still within 1e-4 of the loop);
    --bf16-error-sources reports the ΔH error of rounding only the weights and only the inputs, each a real
    rounding (non-zero error) and each no larger than bf16's own error by more than noise."""
    result = _bench().main(["--model", "tiny", "--n", "8", "--device", "cpu", "--cache-dir", str(tiny_model_cache),
                            "--tune-steps", "2", "--tune-lr", "3e-3", "--rounds", "2", "--warmup-samples", "2",
                            "--peak-seconds", "0.1", "--compile", "--bf16-error-sources"])
    fp32c, bf16c = result["fp32+compile"], result["bf16+compile"]
    assert fp32c["max_abs_diff_nll"] <= 1e-4 and fp32c["max_abs_diff_entropy"] <= 1e-4
    assert fp32c["tok_s"] > 0 and bf16c["tok_s"] > 0 and fp32c["compile_warmup_s"] > 0
    assert bf16c["max_abs_diff_nll"] > 1e-6  # the compiled bf16 path really ran in bf16
    sources = result["bf16_dH_error_sources"]
    assert set(sources) == {"weights", "inputs"}
    for figures in sources.values():
        assert 0 < figures["rms_err_rel"] < 1 and -1 <= figures["spearman"] <= 1
