"""instructdiff: select the supervised fine-tuning data worth training on.

Stages (one module each): data → models → render → calibrate → scoring → selection → train → evaluate,
driven by ``pipeline.run(cfg)`` under the thin Hydra entry in ``instructdiff.run``.
"""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root (the package is installed editable: conf/ and data/ live beside it).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
DATA_DIR = PROJECT_ROOT / "data"

# conf/domain/custom.yaml names the run after its pool file, and Hydra resolves the run directory from
# domain.name before any of our code runs: the resolver must exist as soon as the package is imported.
from instructdiff.resolvers import register as _register_resolvers  # noqa: E402

_register_resolvers()
