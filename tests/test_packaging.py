"""How the project installs: the selector plugins under the import name ``instructdiff_baselines`` (never as
``baselines``, another distribution's name on PyPI), and every package folder in the wheel."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from instructdiff import PROJECT_ROOT


def _setuptools_table() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_every_package_folder_is_listed() -> None:
    table = _setuptools_table()
    folders = {".".join(p.parent.relative_to(PROJECT_ROOT).parts) for p in (PROJECT_ROOT / "instructdiff").rglob("__init__.py")
               if "__pycache__" not in p.parts}
    missing = sorted(folders - set(table["packages"]))
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}: a wheel would leave them out"
    assert table["package-dir"] == {"instructdiff_baselines": "baselines"}
    assert "baselines" not in table["packages"]


@pytest.mark.slow
def test_wheel_installs_the_plugins_as_instructdiff_baselines(tmp_path) -> None:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: no wheel can be built without a network here")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PROJECT_ROOT / name, src / name)
    for folder in ("instructdiff", "baselines"):
        shutil.copytree(PROJECT_ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                            "--target", str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "instructdiff_baselines" / "ifd.py").is_file() and not (target / "baselines").exists()
    probe = ("import instructdiff, instructdiff_baselines.instructdiff_selector as m, instructdiff_baselines.superfiltering\n"
             "import importlib.util\n"
             "print(instructdiff.__file__); print(m.__file__); print(importlib.util.find_spec('baselines'))\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target))
    assert lines[2] == "None", (f"a package named baselines is importable ({lines[2]}): an install from before "
                                "the plugins became instructdiff_baselines? reinstall with pip install -e .")
