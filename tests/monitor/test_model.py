"""Model runtime on local folders; device and dtype resolution; clear errors offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from monitor.model import ModelLoadError, load_model, resolve_device, resolve_dtype


def test_loads_local_folder(tiny_lm: Any, tiny_model_dir: Path) -> None:
    assert tiny_lm.source == str(tiny_model_dir)
    assert tiny_lm.hidden_size == 32 and tiny_lm.n_layers == 4
    assert tiny_lm.device.type == os.environ.get("FEATUREWATCH_TEST_DEVICE", "cpu").split(":")[0]
    assert not tiny_lm.model.training


def test_chat_template_applied(tiny_lm: Any) -> None:
    ids = tiny_lm.chat_ids([{"role": "user", "content": "Write a haiku"}])
    text = tiny_lm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nWrite a haiku<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


def test_unknown_model_id_offline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"'no-such-org/no-such-model' was not found.*downloads are off"):
        load_model("no-such-org/no-such-model", root=tmp_path)


def test_dtype_and_device_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="dtype 'int3'"):
        resolve_dtype("int3", cpu)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_dtype_option_loads_in_that_dtype(tiny_model_dir: Path) -> None:
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
