"""Where a data file named in a config is found, and how its path is shown in messages."""

from __future__ import annotations

from pathlib import Path

from instructdiff import DATA_DIR, PROJECT_ROOT


def _original_cwd() -> Path | None:
    """The directory the user launched from; differs from cwd only when Hydra changed into its run dir."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd()) if HydraConfig.initialized() else None
    except Exception:  # hydra missing or not running: cwd is the launch directory
        return None


def resolve_data_path(p: str | Path) -> Path:
    """An existing file for ``p``: absolute as is; relative against DATA_DIR first, then the working dir."""
    path = Path(p).expanduser()
    if path.is_absolute():
        if path.exists():
            return path
        raise FileNotFoundError(f"data file not found: {path}")
    tried = [DATA_DIR / path, Path.cwd() / path]
    launch = _original_cwd()
    if launch is not None and launch != Path.cwd():
        tried.append(launch / path)
    for candidate in tried:
        if candidate.exists():
            return candidate.resolve()
    raise FileNotFoundError(
        f"data file {str(p)!r} not found; tried " + " and ".join(str(c) for c in tried)
        + " (relative paths resolve against the repository's data/ folder, then the working directory)"
    )


def _display(path: Path) -> str:
    """Short path for messages: relative to the repo when inside it."""
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)
