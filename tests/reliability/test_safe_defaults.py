"""Safe defaults: no remote code, no pickles, no code execution or network unless asked, secrets masked.

Each guard is shown failing closed on a real hostile input (custom model code that writes a marker when
imported, a pickle that writes a marker when loaded, a program that dials a local server), and each has a
control showing that, without the guard, the same input would have done its thing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from instructdiff import CONF_DIR
from instructdiff.evaluate import CODE_OFF, _skip_reason, eval_settings
from instructdiff.lm_eval_tasks import utils
from instructdiff.models import load_model, load_tokenizer, resolve_model
from instructdiff.pipeline import run
from instructdiff.secret_overrides import hide_secret_overrides
from instructdiff.tracking import mask_hydra_outputs, mask_secrets

SECRET = "SUPERSECRET-3f9a1c"


def _tiny_dir(tiny_model_cache: Path, dest: Path) -> Path:
    src = next(p for p in (tiny_model_cache / "models").iterdir() if p.is_dir() and p.name.startswith("tiny-"))
    shutil.copytree(src, dest)
    return dest


def _hub_cfg(path: Path, trust: bool | None = None) -> dict:
    cfg = {"name": "local", "source": "hub", "hf_id": str(path)}
    if trust is not None:
        cfg["trust_remote_code"] = trust
    return cfg


# ------------------------------------------------------------------------------------ remote code


def test_every_bundled_model_config_keeps_remote_code_off() -> None:
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        assert OmegaConf.load(path).get("trust_remote_code", False) is False, path.name


def test_custom_model_code_runs_only_when_the_config_opts_in(tiny_model_cache, tmp_path) -> None:
    model_dir = _tiny_dir(tiny_model_cache, tmp_path / "custom")
    marker = tmp_path / "remote_code_ran"
    (model_dir / "custom_llama.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_llama.CustomConfig",
                          "AutoModelForCausalLM": "custom_llama.CustomModel"}
    config["model_type"] = "custom_llama"
    (model_dir / "config.json").write_text(json.dumps(config))

    ref = resolve_model(_hub_cfg(model_dir), tmp_path / "cache")
    assert ref.trust_remote_code is False
    with pytest.raises(Exception, match="trust_remote_code"):
        load_model(ref, device="cpu")
    assert not marker.exists(), "remote code ran without trust_remote_code"
    # a truthy non-boolean (a typo'd YAML string) is not an opt-in
    assert resolve_model({**_hub_cfg(model_dir), "trust_remote_code": "yes"}, tmp_path / "cache").trust_remote_code \
        is False

    trusted = resolve_model(_hub_cfg(model_dir, trust=True), tmp_path / "cache")
    load_model(trusted, device="cpu")
    assert marker.read_text() == "ran"  # control: with the opt-in the same directory does run its code


# ----------------------------------------------------------------------------------------- pickles


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def test_pickle_weights_are_refused_without_being_opened(tiny_model_cache, tmp_path) -> None:
    model_dir = _tiny_dir(tiny_model_cache, tmp_path / "pickled")
    marker = tmp_path / "pickle_ran"
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save({"state": state, "payload": _Payload(str(marker))}, model_dir / "pytorch_model.bin")

    ref = resolve_model(_hub_cfg(model_dir), tmp_path / "cache")
    with pytest.raises(ValueError, match=r"only pickle-based weights \(pytorch_model\.bin\).*never from pickles"):
        load_model(ref, device="cpu")
    assert not marker.exists()
    load_tokenizer(ref)  # the tokenizer (no weights) still loads: only the weights are refused

    # control: unpickling the file really would have run the payload
    with open(model_dir / "pytorch_model.bin", "rb"):
        torch.load(model_dir / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "unpickled"


def test_safetensors_weights_load(tiny_model_cache, tmp_path) -> None:
    model_dir = _tiny_dir(tiny_model_cache, tmp_path / "ok")
    model = load_model(resolve_model(_hub_cfg(model_dir), tmp_path / "cache"), device="cpu")
    assert sum(p.numel() for p in model.parameters()) > 0


# ------------------------------------------------------------------------------------ code execution


def test_code_execution_is_off_by_default_and_needs_a_real_boolean() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["domain=code"])
    settings = eval_settings(cfg.eval)
    assert settings["allow_code_execution"] is False and "id_humaneval" in settings["tasks"]
    for task in ("id_humaneval", "id_mbpp"):
        assert _skip_reason(task, "generate_until", settings) == CODE_OFF
    with pytest.raises(ValueError, match="allow_code_execution must be true or false"):
        eval_settings({"allow_code_execution": "false"})  # bool("false") would have been True


def test_program_time_memory_and_file_limits() -> None:
    assert utils.run_program("assert sum(range(10)) == 45\n") is True
    t0 = time.time()
    assert utils.run_program("while True:\n    pass\n", timeout=1.0) is False
    assert time.time() - t0 < 8
    assert utils.run_program("x = bytearray(50 * 1024 * 1024)\n") is True  # a modest allocation is fine
    assert utils.run_program("x = bytearray(3 * 1024 ** 3)\n") is False  # beyond RLIMIT_AS
    assert utils.run_program("open('big', 'wb').write(b'0' * (64 * 1024 * 1024))\n") is False  # RLIMIT_FSIZE


def test_program_environment_holds_no_secrets(monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    program = "import os\nassert 'HF_TOKEN' not in os.environ, 'token leaked'\n"
    assert utils.run_program(program) is True
    leaked = subprocess.run([sys.executable, "-c", program], env=dict(os.environ), capture_output=True)
    assert leaked.returncode != 0  # control: a plain subprocess would have inherited it


class _Listener:
    """A TCP server on 127.0.0.1 counting the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def test_program_cannot_reach_the_network() -> None:
    server = _Listener()
    try:
        dial = f"import socket\nsocket.create_connection(('127.0.0.1', {server.port}), timeout=3).close()\n"
        control = subprocess.run([sys.executable, "-c", dial], capture_output=True, timeout=30)
        assert control.returncode == 0 and _wait_for(lambda: server.accepted == 1)  # the server is reachable
        assert utils.run_program(dial) is False
        if "namespace" in utils.sandbox_info()["network"]:
            # a grandchild interpreter has no audit hook; the empty network namespace still stops it
            nested = f"import subprocess, sys\nsys.exit(subprocess.run([{sys.executable!r}, '-c', {dial!r}]).returncode)\n"
            assert utils.run_program(nested) is False
        time.sleep(0.5)
        assert server.accepted == 1, "a sandboxed program reached the server"
    finally:
        server.close()


def _wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# --------------------------------------------------------------------------------- W&B and secrets


def test_wandb_is_offline_unless_configured(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config")
        online = compose("config", overrides=["logger.mode=online"])
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"
    assert online.logger.mode == "online"  # configurable, never the default


def test_mask_secrets_masks_credentials_and_keeps_the_rest() -> None:
    cfg = {"logger": {"api_key": SECRET, "name": "wandb"}, "hf_token": SECRET, "db": {"password": SECRET},
           "wandbApiKey": SECRET, "score": {"max_tokens_per_batch": 4096}, "model": {"num_key_value_heads": 2},
           "overrides": ["seed=1", f"+logger.api_key={SECRET}"], "dirname": f"seed=1,+hf_token={SECRET},x=2"}
    masked = mask_secrets(cfg)
    assert SECRET not in json.dumps(masked)
    assert masked["score"] == {"max_tokens_per_batch": 4096} and masked["model"] == {"num_key_value_heads": 2}
    assert masked["overrides"] == ["seed=1", "+logger.api_key=***"] and masked["dirname"] == "seed=1,+hf_token=***,x=2"
    assert cfg["logger"]["api_key"] == SECRET  # a copy: the running config keeps the real value


def test_manifest_and_wandb_run_hold_no_secret(make_cfg, tmp_path) -> None:
    run(make_cfg("logger=wandb", f"+logger.api_key={SECRET}", f"+model.hf_token={SECRET}", "selector=random",
                 "pipeline.stages=[select]"))
    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["logger"]["api_key"] == "***" and manifest["config"]["model"]["hf_token"] == "***"
    assert manifest["config"]["model"]["name"] == "tiny"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files)
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]


@pytest.mark.slow
def test_cli_run_leaves_no_secret_in_hydra_or_wandb_files(tmp_path, tiny_model_cache) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    out = subprocess.run(
        [sys.executable, "-m", "instructdiff", "model=tiny", "logger=wandb", f"+logger.api_key={SECRET}",
         "eval=none", "selector=random", "domain.pool_size=12", "pipeline.stages=[select]",
         f"paths.output_root={tmp_path / 'o'}", f"paths.cache_dir={cache}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    files = [p for p in (tmp_path / "o").rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in files) and any("wandb" in str(p) for p in files)
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks
    overrides = next(p for p in files if p.name == "overrides.yaml").read_text()
    assert "+logger.api_key=***" in overrides


def test_mask_hydra_outputs_rewrites_only_files_with_secrets(tmp_path) -> None:
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text(f"seed: 0\nlogger:\n  api_key: {SECRET}\n")
    (hydra_dir / "overrides.yaml").write_text("- seed=0\n")
    assert mask_hydra_outputs(tmp_path) == [hydra_dir / "config.yaml"]
    assert SECRET not in (hydra_dir / "config.yaml").read_text()
    assert pickle.dumps(OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml")))  # still valid YAML


def test_secret_overrides_reach_hydra_only_as_environment_interpolations() -> None:
    env: dict[str, str] = {}
    argv = ["-m", "selector=random,length", f"+wandb.api_key={SECRET}", f"hydra.job.env_set.HF_TOKEN='{SECRET}'",
            f"+logger.token={SECRET}-a,{SECRET}-b", "model.num_key_value_heads=2", "+db.password=${oc.env:PW}",
            "--cfg", "job", "domain.pool_path=/data/my.jsonl"]
    out = hide_secret_overrides(argv, env)
    assert SECRET not in " ".join(out)
    assert out[:2] == argv[:2] and out[5:] == argv[5:]  # options, non-secret and non-text values untouched
    assert out[2] == "+wandb.api_key=${oc.env:INSTRUCTDIFF_SECRET_WANDB_API_KEY}"
    assert env["INSTRUCTDIFF_SECRET_WANDB_API_KEY"] == SECRET
    assert env["INSTRUCTDIFF_SECRET_HYDRA_JOB_ENV_SET_HF_TOKEN"] == SECRET  # Hydra's quotes are not part of it
    # a sweep over secrets stays a sweep, one variable per value
    assert out[4] == ("+logger.token=${oc.env:INSTRUCTDIFF_SECRET_LOGGER_TOKEN_0},"
                      "${oc.env:INSTRUCTDIFF_SECRET_LOGGER_TOKEN_1}")
    assert env["INSTRUCTDIFF_SECRET_LOGGER_TOKEN_1"] == f"{SECRET}-b"
    # what Hydra composes from the rewritten override is the real value, in memory
    os.environ.update(env)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["model=tiny", out[2]])
        assert cfg.wandb.api_key == SECRET
        assert OmegaConf.to_container(cfg, resolve=False)["wandb"]["api_key"].startswith("${oc.env:")
    finally:
        for k in env:
            os.environ.pop(k, None)
