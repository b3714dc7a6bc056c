"""Secret-looking overrides never reach Hydra as text: the console entry moves each value into the process
environment and hands Hydra ``key=${oc.env:INSTRUCTDIFF_SECRET_<KEY>}`` instead.

Hydra copies every override verbatim into places that get shared or kept on a cluster: job folder names,
``multirun.yaml``, each job's ``.hydra/`` files, submitit's pickles and logs, and the "Error executing job with
overrides" line. Masking each copy afterwards cannot work for all of them: the sweeper writes ``multirun.yaml``
before any of our code runs on it, and plugins make copies we never see. An interpolation is harmless in every
copy and resolves to the real value only in the memory of the job. Jobs in other processes (joblib, submitit's
local subprocesses, SLURM jobs under sbatch's default ``--export=ALL``) inherit the environment.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping

from instructdiff.tracking import is_secret_key

ENV_PREFIX = "INSTRUCTDIFF_SECRET_"


def _env_name(key: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_").upper()


def _secret_values(value_text: str) -> list[str] | None:
    """The string values Hydra would read from ``value_text`` (several for a sweep ``a,b``); None when the value
    is not text (a number, list, interpolation, ...), which mask_secrets leaves visible too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not value_text or "${" in value_text:  # empty, or already an interpolation: nothing secret on the line
        return None
    try:
        override = OverridesParser.create().parse_override(f"k={value_text}")
    except Exception:  # Hydra would reject it and echo it back: hide the raw text rather than leak it
        return [value_text]
    if override.is_sweep_override():
        values = list(override.sweep_iterator())
    else:
        values = [override.value()]
    return values if all(isinstance(v, str) and v for v in values) else None


def hide_secret_overrides(argv: list[str], environ: MutableMapping[str, str]) -> list[str]:
    """``argv`` with the value of every override whose last key component looks secret (token, key, secret,
    password; :func:`instructdiff.tracking.is_secret_key`) replaced by an ``oc.env`` interpolation of a new
    variable in ``environ`` that holds it. Options and other overrides are returned unchanged."""
    out = []
    for arg in argv:
        name, sep, value_text = arg.partition("=")
        key = name.lstrip("+~")
        # "~key=value" deletes only if the value matches what is written: left as it is
        if arg.startswith(("-", "~")) or not sep or not is_secret_key(key.rsplit(".", 1)[-1]):
            out.append(arg)
            continue
        values = _secret_values(value_text)
        if values is None:
            out.append(arg)
            continue
        refs = []
        for k, v in enumerate(values):
            var = _env_name(key) + (f"_{k}" if len(values) > 1 else "")
            environ[var] = v
            refs.append(f"${{oc.env:{var}}}")
        out.append(f"{name}={','.join(refs)}")
    return out
