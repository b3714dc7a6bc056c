"""Every `instructdiff` command a user can copy (the README's bash blocks, each preset's and profile's opening
comments) composes into jobs whose selectors build, and the cheap ones run for real on the tiny model.

The commands are read from the files at test time, so an example edited into the README or a preset is
tested without touching this file; an example that breaks fails CI instead of a new user's first hour."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from instructdiff import CONF_DIR, PROJECT_ROOT
from instructdiff.config_check import check_argv, check_selector_cfg
from instructdiff.selection import Selector

README = PROJECT_ROOT / "README.md"
PRESET_FILES = sorted([*(CONF_DIR / "experiment").glob("*.yaml"), *(CONF_DIR / "profile").glob("*.yaml")])


def _strip_comment(line: str) -> str:
    return re.split(r"\s#", line, maxsplit=1)[0].strip()


def _readme_commands() -> list[tuple[str, str]]:
    found, in_bash = [], False
    for n, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash:
            cmd = _strip_comment(line.split("&&")[-1])  # "bash scripts/install.sh && instructdiff"
            if cmd.startswith(("instructdiff ", "instructdiff-")) or cmd == "instructdiff":
                found.append((f"README.md:{n}", cmd))
    return found


def _preset_commands() -> list[tuple[str, str]]:
    found = []
    for path in PRESET_FILES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.startswith("#"):
                break  # only the opening comment block holds commands
            text = line.lstrip("# ").removeprefix("then: ")
            cmd = _strip_comment(re.split(r"\s{2,}\(", text)[0])  # "cmd   (what it runs)"
            cmd = cmd.split("(and `")[0].strip()
            if cmd.startswith("instructdiff ") or cmd.startswith("instructdiff-"):
                found.append((f"{path.relative_to(PROJECT_ROOT)}:{n}", cmd))
    return found


COMMANDS = _readme_commands() + _preset_commands()
RUN_COMMANDS = [(where, cmd) for where, cmd in COMMANDS if cmd.split()[0] == "instructdiff"]


def test_the_examples_are_found():
    # guards the parser: if it silently found nothing, every test below would pass vacuously
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert "README.md" in where and "conf/experiment/paper_table.yaml" in where and "conf/profile/cpu.yaml" in where
    assert len(RUN_COMMANDS) >= 15
    assert any(c == "instructdiff" for _, c in RUN_COMMANDS)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _jobs(args: list[str]) -> list[list[str]]:
    """The override list of every job the command starts: the command's own sweep (with -m) expanded by
    Hydra's basic sweeper, over the preset's hydra.sweeper.params the command does not override."""
    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    cfg = _compose([o.input_line for o in parsed if not o.is_sweep_override()])
    if not multirun and str(cfg.hydra.mode) != "RunMode.MULTIRUN":
        return [overrides]
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    params = {k: v for k, v in (cfg.hydra.sweeper.params or {}).items() if k not in given}
    sweep = [*overrides, *(f"{k}={v}" for k, v in params.items())]
    return [list(job) for job in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(sweep), None)[0]]


@pytest.mark.parametrize("where,cmd", RUN_COMMANDS, ids=[w for w, _ in RUN_COMMANDS])
def test_every_example_composes_and_builds_its_selectors(where, cmd):
    args = shlex.split(cmd)[1:]
    assert check_argv(args) is None, f"{where}: {cmd}"
    jobs = _jobs(args)
    assert jobs, f"{where}: no job"
    distinct = {tuple(o for o in job if not o.startswith("seed=")) for job in jobs}
    for job in sorted(distinct):
        cfg = _compose(list(job))
        plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.resolve(plain)  # every interpolation outside hydra resolves
        check_selector_cfg(cfg.selector, cfg.hydra.runtime.choices.get("selector"))
        assert isinstance(instantiate(cfg.selector, _convert_="all"), Selector), f"{where}: {job}"


# Run for real on the tiny model: the examples that are one run, or a handful of jobs. Study presets (tens of
# jobs of the real model) are composed above; their CPU figures are in the presets' comments and results/.
TINY_RUN = ["model=tiny", "logger=none", "eval=none", "domain.pool_size=24", "trainer.epochs=1",
            "trainer.progress_bar=false"]
MAX_REAL_JOBS = 6


@pytest.mark.slow
@pytest.mark.parametrize("where,cmd", RUN_COMMANDS, ids=[w for w, _ in RUN_COMMANDS])
def test_the_cheap_examples_run_on_the_tiny_model(where, cmd, tmp_path, tiny_model_cache):
    import shutil

    n_jobs = len(_jobs(shlex.split(cmd)[1:]))
    if n_jobs > MAX_REAL_JOBS:
        pytest.skip(f"{n_jobs} jobs: composed by the test above, too many to run here")
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    args = shlex.split(cmd)[1:]
    pool = tmp_path / "my_pool.jsonl"
    pool.write_text("".join(
        f'{{"instruction": "What is {k} plus {k + 3}?", "input": "", "response": "It is {2 * k + 3}."}}\n'
        for k in range(30)))
    args = [a.replace("my_pool.jsonl", str(pool)) for a in args]
    stages = [] if "experiment=smoke" in args else ["pipeline.stages=[calibrate,score,select]"]
    extra = [*TINY_RUN, *stages, f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={cache}"]
    if "-m" in args:
        extra.append(f"hydra.sweep.dir={tmp_path / 'sweep'}")
    if "experiment=smoke" in args:
        extra = [e for e in extra if not e.startswith(("eval=", "domain.pool_size", "trainer.epochs"))]
    r = subprocess.run([sys.executable, "-m", "instructdiff", *args, *extra], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    assert r.returncode == 0, f"{where}: {cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    results = list(Path(tmp_path).rglob("results.json"))
    assert len(results) == n_jobs, f"{where}: {cmd}"


def test_the_validator_example_runs_on_a_shipped_file():
    shipped = next((PROJECT_ROOT / "data" / "math").rglob("*.jsonl*"))
    r = subprocess.run([sys.executable, "-m", "instructdiff.validate", str(shipped)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert any(c.startswith("instructdiff-validate ") for _, c in COMMANDS)
