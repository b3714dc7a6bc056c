"""No traceback reaches a user for a configuration, input or file-system problem: one line on stderr naming the
key or path, the cause and the fix, and exit status 1. Each case runs the real console entry
(``python -m instructdiff``) on the tiny model and checks the exact message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from instructdiff import CONF_DIR


def _cli(tmp_path: Path, *args: str, multirun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "instructdiff", *(["-m"] if multirun else []), "model=tiny",
                           "logger=none", "eval=none", "pipeline.stages=[select]", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error line, after checking it is the run's last word, alone, with status 1 and no traceback."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("instructdiff: error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-2000:]
    return errors[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "results.txt"
    path.write_text("a user's file\n")
    return path


def test_hydra_run_dir_naming_a_file(tmp_path, a_file):
    msg = _one_line_error(_cli(tmp_path, f"hydra.run.dir={a_file}", f"paths.output_root={tmp_path / 'o'}"))
    assert msg == (f"instructdiff: error: hydra.run.dir = {a_file}: is a file, not a directory; point "
                   "hydra.run.dir at a directory (new or existing) or move the file away")
    assert a_file.read_text() == "a user's file\n"


def test_hydra_run_dir_under_a_file(tmp_path, a_file):
    msg = _one_line_error(_cli(tmp_path, f"hydra.run.dir={a_file}/run", f"paths.output_root={tmp_path / 'o'}"))
    assert msg == (f"instructdiff: error: hydra.run.dir = {a_file}/run: lies under the file {a_file}, not a "
                   "directory; point hydra.run.dir at a directory (new or existing) or move the file away")


def test_paths_run_dir_naming_a_file(tmp_path, a_file):
    msg = _one_line_error(_cli(tmp_path, f"paths.run_dir={a_file}", f"paths.output_root={tmp_path / 'o'}"))
    assert msg == (f"instructdiff: error: paths.run_dir = {a_file}: is a file, not a directory; point "
                   "paths.run_dir at a directory (new or existing) or move the file away")
    assert not (tmp_path / "o").exists()  # stopped before Hydra made the run folder


def test_a_multirun_whose_output_root_is_a_file(tmp_path, a_file):
    msg = _one_line_error(_cli(tmp_path, "selector=random,length", f"paths.output_root={a_file}", multirun=True))
    assert msg == (f"instructdiff: error: paths.output_root = {a_file}: is a file, not a directory; point "
                   "paths.output_root at a directory (new or existing) or move the file away")


def test_an_unset_environment_variable_in_a_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NOPE_NOT_SET"}
    proc = subprocess.run([sys.executable, "-m", "instructdiff", "model=tiny", "logger=none",
                           "paths.output_root=${oc.env:NOPE_NOT_SET}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    msg = _one_line_error(proc)
    assert msg == ("instructdiff: error: paths.output_root = '${oc.env:NOPE_NOT_SET}': environment variable "
                   "NOPE_NOT_SET is not set; export NOPE_NOT_SET=... or give a default in the config: "
                   "${oc.env:NOPE_NOT_SET,<default>}")
    assert not list(tmp_path.iterdir())  # nothing was created, not even a folder named after the interpolation


def test_an_unset_environment_variable_in_a_multirun_and_in_another_key(tmp_path):
    msg = _one_line_error(_cli(tmp_path, "selector=random,length", f"paths.output_root={tmp_path / 'o'}",
                               "paths.cache_dir=${oc.env:NOPE_NOT_SET}/cache", multirun=True))
    assert msg.startswith("instructdiff: error: paths.cache_dir = '${oc.env:NOPE_NOT_SET}/cache': environment "
                          "variable NOPE_NOT_SET is not set; export NOPE_NOT_SET=...")
    msg = _one_line_error(_cli(tmp_path, f"paths.output_root={tmp_path / 'o'}", "+data.note=${nowhere.key}"))
    assert msg == ("instructdiff: error: data.note = '${nowhere.key}' cannot be resolved: Interpolation key "
                   "'nowhere.key' not found; fix the interpolation or set data.note to a plain value")


def test_a_missing_pool_file_names_the_key_the_path_and_where_it_looked(tmp_path):
    msg = _one_line_error(_cli(tmp_path, "domain.pool_path=nowhere/my_pool.jsonl",
                               f"paths.output_root={tmp_path / 'o'}"))
    assert msg.startswith("instructdiff: error: domain.pool_path: data file 'nowhere/my_pool.jsonl' not found; "
                          f"tried {CONF_DIR.parent / 'data' / 'nowhere' / 'my_pool.jsonl'} and "
                          f"{tmp_path / 'nowhere' / 'my_pool.jsonl'}")


def test_a_selector_target_that_does_not_import(tmp_path):
    msg = _one_line_error(_cli(tmp_path, "selector=random", "selector._target_=my_plugins.Nope",
                               f"paths.output_root={tmp_path / 'o'}"))
    assert msg.startswith("instructdiff: error: selector._target_ = 'my_plugins.Nope' cannot be imported "
                          "(ModuleNotFoundError: No module named 'my_plugins'); choose a selector by name "
                          "(selector=<complexity, ")


def test_a_setting_checked_by_the_pipeline_is_one_line(tmp_path):
    msg = _one_line_error(_cli(tmp_path, "pipeline.stages=[select,tain]", f"paths.output_root={tmp_path / 'o'}"))
    assert msg.startswith("instructdiff: error: pipeline.stages has unknown stage(s) ['tain']; known: ")


def test_the_outputs_line_prints_a_path_with_brackets_as_it_is(tmp_path, tiny_model_cache):
    """rich reads "[select]" as markup: the printed path lost it and named a folder that does not exist."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    run_dir = tmp_path / "runs" / "stages=[select]" / ("long-name-" * 8)  # longer than 80 columns in all
    proc = _cli(tmp_path, "selector=random", "domain.pool_size=12", f"paths.run_dir='{run_dir}'",
                f"paths.output_root={tmp_path / 'o'}", f"paths.cache_dir={cache}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = re.findall(r"^outputs: .*$", proc.stdout, flags=re.M)
    assert line == f"outputs: {run_dir}" and (run_dir / "results.json").is_file()
