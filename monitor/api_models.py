"""Request bodies of the OpenAI-compatible API (the subset featurewatch serves), validated by pydantic.

Field names and defaults follow OpenAI's API reference (temperature 1, top_p 1, `max_tokens` 16 for the
legacy completions endpoint). Options that would change the output in ways featurewatch does not
implement are refused with a 400 naming the field rather than silently ignored; purely informational
ones (`user`, `metadata`) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]
MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
# torch's generator takes a 64-bit seed: a larger one would fail the whole batch it was generated in
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def unicode_text(value: Any) -> Any:
    """`value` unchanged, or ValueError when a string in it is not text. JSON may escape half a UTF-16
    surrogate pair (`"\\ud800"`) and Python's parser accepts it, but no tokenizer, UTF-8 log line or Redis
    write can take it later, so requests carrying one are refused up front (400 naming the field)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode text (a lone surrogate escape such as \\ud800)") from None
    elif isinstance(value, list):
        for item in value:
            unicode_text(item)
    elif isinstance(value, dict):
        for k, v in value.items():
            unicode_text(k)
            unicode_text(v)
    return value


class StrictBody(BaseModel):
    """A request body part: unknown fields and non-text strings are refused."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _text(cls, v: Any) -> Any:
        return unicode_text(v)


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(StrictBody):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(StrictBody):
    include_usage: bool = False


class _Sampling(StrictBody):
    """Fields shared by both endpoints."""

    model: str = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(default=1, ge=1)
    user: str | None = None
    metadata: dict[str, str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else (stop or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        return stop

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:  # 0 and None change nothing
            raise ValueError("penalties are not supported; leave the field out or set it to 0")
        return v

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v != {"type": "text"}:
            raise ValueError("only {'type': 'text'} is supported")
        return v

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # the legacy endpoint's documented default
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: send one prompt per request (a string or a list of one string)")
        if self.echo:
            raise ValueError("echo: not supported")
        if self.logprobs:
            raise ValueError("logprobs: not supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        return self

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_budget(self) -> int | None:
        return self.max_tokens


class ScoreRequest(StrictBody):
    """Shadow mode: a conversation produced elsewhere (OpenAI chat format, last assistant turn = the
    monitored completion), or a bare text."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    text: str | None = None
    detectors: list[str] | None = None  # default: every detector the server reports and the policy reads
    route: str = "/v1/chat/completions"  # the route whose rules apply (rules may be route-scoped)
    top_k: int = Field(default=5, ge=0, le=50)

    @model_validator(mode="after")
    def _one_input(self) -> ScoreRequest:
        if (self.messages is None) == (self.text is None):
            raise ValueError("give exactly one of `messages` and `text`")
        return self

    def record(self) -> dict[str, Any]:
        if self.messages is not None:
            return {"id": "score", "messages": [{"role": m.role, "content": m.text()} for m in self.messages]}
        return {"id": "score", "text": self.text}
