#!/usr/bin/env bash
# The GPU check of issue 15, one script, under 10 minutes on one GPU (no network needed):
#   1. the scoring benchmark on CUDA with a random-initialised Qwen2.5-0.5B shape (tokens/s, fraction of the
#      measured matmul peak, fidelity of fp32 and bf16 against a batch-1 loop);
#   2. a 2-stage pipeline on CUDA in bf16: calibration SFT + scoring (and the cheap select step that writes
#      the selection) of the embedded SmolLM2-135M on 2,000 GSM8K rows;
#   3. tokens/s and MFU of each: model FLOPs per second over the GPU's dense bf16 peak (datasheet) and over
#      the peak the benchmark measured.
#
#   bash scripts/gpu_check.sh                   # writes results/gpu/<date>_<time>/ (and copies it to $OUT if set)
#   bash scripts/gpu_check.sh --cpu-dry-run     # the same steps on CPU with the tiny model: checks the plumbing
#   GPU_CHECK_RESULTS=/tmp/g bash scripts/gpu_check.sh --cpu-dry-run   # ... written outside results/
#
# Everything printed also goes to results/gpu/<run>/gpu_check.log; summary.json holds the figures.
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; fi
cd "$(dirname "$0")/.."
RUN="${GPU_CHECK_RESULTS:-results/gpu}/$(date +%Y-%m-%d_%H%M%S)$([[ $DRY == 1 ]] && echo _cpu-dry-run)"
mkdir -p "$RUN"
exec > >(tee "$RUN/gpu_check.log") 2>&1
CACHE="${GPU_CHECK_CACHE:-$(mktemp -d)/cache}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
PY="${PYTHON:-python3}"

echo "== gpu_check $(date -Is) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') dry_run=$DRY"
"$PY" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "transformers", "trl", "hydra", "lm_eval", "instructdiff") if not importlib.util.find_spec(m)]
if missing:
    sys.exit(f"missing Python packages {missing}: run `bash scripts/install.sh` (needs a network once) first")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no GPU)")
EOF
if [[ $DRY == 0 ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run with --cpu-dry-run to check the plumbing')"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
  BENCH=(--device cuda --random-init qwen2.5-0.5b --n 256)
  PIPE=(model=smollm2_135m domain.pool_size=2000 trainer.precision=bf16 score.dtype=bf16 score.device=cuda
        score.max_tokens_per_batch=16384 score.max_batch_size=128 trainer.per_device_batch_size=8
        trainer.gradient_accumulation_steps=1)
  T_BENCH=270; T_PIPE=270
else
  BENCH=(--device cpu --model tiny --n 8 --rounds 1 --tune-steps 1 --peak-seconds 0.2)
  PIPE=(model=tiny domain.pool_size=48 trainer.precision=bf16 score.dtype=bf16 score.device=cpu
        trainer.per_device_batch_size=4 trainer.gradient_accumulation_steps=1 trainer.epochs=1)
  T_BENCH=300; T_PIPE=300
fi

echo "== 1/3 scoring benchmark: scripts/bench_scoring.py ${BENCH[*]}"
timeout "$T_BENCH" "$PY" scripts/bench_scoring.py "${BENCH[@]}" --cache-dir "$CACHE" | tee "$RUN/bench_scoring.out"
tail -n 1 "$RUN/bench_scoring.out" > "$RUN/bench_scoring.json"

echo "== 2/3 pipeline calibrate + score (+ select) in bf16: ${PIPE[*]}"
timeout "$T_PIPE" "$PY" -m instructdiff "${PIPE[@]}" selector=instructdiff logger=none eval=none \
  "pipeline.stages=[calibrate,score,select]" trainer.progress_bar=false \
  "paths.cache_dir=$CACHE" "paths.run_dir=$RUN/pipeline" "hydra.run.dir=$RUN/pipeline/hydra"

echo "== 3/3 tokens/s and MFU"
"$PY" - "$RUN" <<'EOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
bench = json.loads((run / "bench_scoring.json").read_text())
results = json.loads((run / "pipeline" / "results.json").read_text())
device = bench["device"]
# dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s); None: not listed, MFU vs measured only
DATASHEET_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.05e12,
                  "A10G": 70.0e12, "L4": 121.0e12}
peak_sheet = next((v for k, v in DATASHEET_BF16.items() if k in device), None)
peak_measured = bench.get("peak_flops_bf16")


def mfu(flops, seconds, peak):
    return None if not (flops and seconds and peak) else round(flops / seconds / peak, 4)


summary = {"device": device, "datasheet_bf16_flops": peak_sheet, "measured_bf16_flops": peak_measured,
           "scoring_benchmark": {k: bench.get(k) for k in (
               "model", "n_tokens", "engine_fp32_tok_s", "engine_bf16_tok_s", "loop_tok_s", "frac_peak_fp32",
               "frac_peak_bf16", "speedup_bf16", "spearman_dH_bf16", "top10_overlap_dH_bf16")}}
# the engine's bf16 figures: FLOP/s achieved = frac_peak_bf16 × the measured peak
if bench.get("frac_peak_bf16") and peak_measured:
    summary["scoring_benchmark"]["bf16_mfu_datasheet"] = (
        None if not peak_sheet else round(bench["frac_peak_bf16"] * peak_measured / peak_sheet, 4))
stages = results["cost"]["stages"]
# tokens through the model in this run: a training's tokens count once per epoch; cache hits count nothing
tokens = {st: sum((e.get("tokens") or 0) * float(e.get("epochs") or 1) for e in results["cost"]["events"]
                  if e["stage"] == st and not e["cached"]) for st in ("calibrate", "score")}
pipe = {}
for st in ("calibrate", "score"):
    s = stages[st]
    pipe[st] = {"seconds": s["seconds"], "flops": s["flops"], "tokens": tokens[st] or None,
                "tokens_per_s": round(tokens[st] / s["seconds"], 1) if tokens[st] and s["seconds"] else None,
                "mfu_datasheet": mfu(s["flops"], s["seconds"], peak_sheet),
                "mfu_measured_peak": mfu(s["flops"], s["seconds"], peak_measured)}
# the stage's wall time includes loading the model and building the trainer; the trainer's own seconds do not
train_s = sum(t.get("seconds") or 0 for t in results["trainings"] if not t.get("cached"))
pipe["calibrate"]["tokens_per_s_in_trainer"] = round(tokens["calibrate"] / train_s, 1) if train_s else None
pipe["calibrate"]["mfu_datasheet_in_trainer"] = mfu(stages["calibrate"]["flops"], train_s, peak_sheet)
summary["pipeline"] = {"stages": pipe, "selection": results.get("selection", {}).get("counts"),
                       "trainings": [{k: t.get(k) for k in ("purpose", "steps", "train_loss", "precision", "seconds")}
                                     for t in results["trainings"]]}
(run / "summary.json").write_text(json.dumps(summary, indent=2))
b = summary["scoring_benchmark"]
print(f"device: {device}; bf16 peak: datasheet {peak_sheet or float('nan'):.3g}, measured {peak_measured or float('nan'):.3g} FLOP/s")
print(f"scoring benchmark ({b['model']}): engine bf16 {b['engine_bf16_tok_s']} tok/s, fp32 {b['engine_fp32_tok_s']} tok/s, "
      f"loop {b['loop_tok_s']} tok/s; bf16 {b['frac_peak_bf16']} of the measured peak, "
      f"MFU (datasheet) {b.get('bf16_mfu_datasheet')}")
for st, p in pipe.items():
    print(f"pipeline {st:<9}: {p['tokens']} tokens in {p['seconds']:.1f}s = {p['tokens_per_s']} tok/s; "
          f"MFU {p['mfu_datasheet']} (datasheet), {p['mfu_measured_peak']} (measured peak)")
c = pipe["calibrate"]
print(f"  calibrate inside the trainer: {c['tokens_per_s_in_trainer']} tok/s, MFU {c['mfu_datasheet_in_trainer']} (datasheet)")
print(json.dumps(summary))
EOF
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then cp -r "$RUN" "$OUT/"; fi
echo "== done: $RUN"
