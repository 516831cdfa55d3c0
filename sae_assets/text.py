"""Turning corpus records (`text` or chat `messages`) into token ids with the model's own chat template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A JSON Lines record that is neither a `text` nor a `messages` record; names the line."""


def chat_token_ids(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Render `messages` with the tokenizer's chat template (plain `role: content` lines without one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    if add_generation_prompt:
        text += "assistant:"
    return list(tokenizer(text)["input_ids"])


def record_token_ids(tokenizer: Any, record: dict[str, Any]) -> list[int]:
    """A chat record is rendered with the template (no generation prompt); a text record is tokenized
    with the tokenizer's own BOS handling."""
    msgs = record.get("messages")
    if isinstance(msgs, list) and msgs:
        return chat_token_ids(tokenizer, msgs, add_generation_prompt=False)
    text = record.get("text")
    if isinstance(text, str):
        return list(tokenizer(text)["input_ids"])
    raise RecordError("record has neither a non-empty `messages` list nor a `text` string")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, record); a bad line raises RecordError naming file and line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
            if not isinstance(rec, dict):
                raise RecordError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, rec
