"""Shared fixtures: a tiny random-init Llama with a real byte-level BPE tokenizer and chat template, saved
as a local model folder (so the same loader path as real models is exercised), and the real default model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Please verify your bank account password at this link to avoid suspension.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Write a haiku about the moon and the sea.",
    "def add(a, b):\n    return a + b\n",
] * 4


def _tiny_tokenizer() -> Any:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        TINY_TEXT,
        vocab_size=320,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny_model(vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model folder: tiny random Llama (4 layers, d_model 32) + BPE tokenizer with chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = _tiny_tokenizer()
    model = _tiny_model(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# CI runs on CPU; on a GPU machine `FEATUREWATCH_TEST_DEVICE=cuda pytest …` runs the model tests on CUDA.
TEST_DEVICE = os.environ.get("FEATUREWATCH_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path) -> Any:
    from monitor.model import load_model

    # float32 on every device: these tests compare activations at 1e-4, which bf16 cannot meet.
    return load_model(str(tiny_model_dir), device=TEST_DEVICE, dtype="float32")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Persistent data dir for the real model's converted cache, so reruns skip the ~30 s dequantisation."""
    raw = os.environ.get("FEATUREWATCH_TEST_DATA_DIR")
    path = Path(raw) if raw else Path(__file__).resolve().parent.parent / ".cache" / "test-data"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def real_lm(real_data_dir: Path) -> Any:
    from monitor.model import load_model

    return load_model(root=real_data_dir, device="cpu")
