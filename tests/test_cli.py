"""The console entry as a user meets it: a broken pool file ends the run with the file and line named, a
non-zero exit status and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from instructdiff import DATA_DIR


def test_a_broken_pool_line_is_named_without_a_traceback(tmp_path: Path) -> None:
    good = (DATA_DIR / "math" / "gsm8k" / "train.jsonl").read_text().splitlines()[:3]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join([*good, '{"question": "x", "answer": ', good[0]]) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "instructdiff", "model=tiny", "logger=none",
                           f"domain.pool_path={pool}", "pipeline.stages=[select]",
                           f"paths.output_root={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"instructdiff: error: {pool}:4: invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
