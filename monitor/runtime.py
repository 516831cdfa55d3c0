"""Everything a running sidecar holds, loaded once and checked before the first request (fail fast).

Start-up refuses to serve, with a message naming the setting at fault, when the model or SAE cannot be
loaded, the SAE does not fit the model (width, hook layer), a detector is unknown or broken (the valid
names are listed), or the policy is invalid or asks to steer with a detector that cannot steer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detectors.aggregate import Aggregation
from detectors.base import Detector
from monitor.engine import Engine
from monitor.generate import Generator
from monitor.monitoring import DetectorSet
from monitor.policy_checks import policy_issues
from monitor.settings import Settings
from policies.loader import PolicyError
from policies.reload import PolicyHolder, PolicyWatcher
from policies.schema import Policy

log = logging.getLogger(__name__)
# tokens: beyond this the added latency outweighs withholding a long trigger. 16: the default policy's
# scam rules wait for 16 tokens, because the scam probe's running mean is calibrated on stream peaks from
# token 16 (earlier it is noisy; docs/benchmarks.md, [3/7]); a smaller cap would let a blocked scam's
# first tokens out.
HOLD_BACK_CAP = 16


class StartupError(RuntimeError):
    """The sidecar cannot start; the message says which setting and why."""


@dataclass
class Runtime:
    settings: Settings
    lm: Any  # monitor.model.LoadedModel
    sae: Any  # sae_assets.sae.SAE or None when monitoring is off
    sae_folder: Path
    dset: DetectorSet
    holder: PolicyHolder
    engine: Engine
    max_prompt_tokens: int
    watcher: PolicyWatcher | None = None
    versions: dict[str, str] = field(default_factory=dict)  # model/SAE names + digests, for audit records

    @property
    def policy(self) -> Policy:
        return self.holder.policy

    def hold_back(self, policy: Policy) -> int:
        if self.settings.hold_back_tokens is not None:
            return self.settings.hold_back_tokens
        return derived_hold_back(policy)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.engine.stop()


def derived_hold_back(policy: Policy) -> int:
    """Tokens a block rule may need before it can fire: min_tokens-1, n-1 for sustained(n), count-1 for
    count_over (capped: the latency cost is this many tokens)."""
    need = 0
    for rule in policy.rules:
        # conversation rules count turns, not tokens: a block there fires on the turn's first scored token
        if not rule.enabled or rule.action != "block" or rule.scope in ("prompt", "conversation"):
            continue
        need = max(need, rule.min_tokens - 1)
        agg = rule.aggregation
        if not isinstance(agg, Aggregation):
            continue
        if agg.kind == "sustained" and agg.n:
            need = max(need, agg.n - 1)
        elif agg.kind == "count_over" and isinstance(rule.threshold, float):
            need = max(need, int(rule.threshold) - 1)
    return min(need, HOLD_BACK_CAP)


@dataclass(frozen=True)
class Parts:
    """What the sidecar and the scoring workers both load: model, SAE (on the model's device), its folder,
    the detectors (every spec in the folder, so a reloaded policy may use any) and their valid names."""

    lm: Any
    sae: Any
    folder: Path
    dset: DetectorSet
    valid: list[str]


def load_parts(settings: Settings) -> Parts:
    """Load and cross-check model, SAE and detectors; StartupError names the setting at fault."""
    from detectors.build import shipped_detectors
    from detectors.errors import DetectorError
    from detectors.registry import available_detectors, load_detectors
    from monitor.model import ModelLoadError, load_model
    from sae_assets.dashboards import label_fn
    from sae_assets.hooks import layer_index
    from sae_assets.registry import resolve_sae_path
    from sae_assets.sae import SAE, SAEFormatError

    try:
        folder = resolve_sae_path(settings.sae)
        sae = SAE.load(folder)
    except (FileNotFoundError, SAEFormatError) as e:
        raise StartupError(f"sae: {e}") from None
    try:
        lm = load_model(
            settings.model, device=settings.device, dtype=settings.dtype, root=settings.resolved_data_dir()
        )
    except ModelLoadError as e:
        raise StartupError(f"model: {e}") from None
    if sae.d_in != lm.hidden_size:
        raise StartupError(
            f"sae: {settings.sae!r} reads width {sae.d_in} but model {settings.model!r} has hidden size "
            f"{lm.hidden_size}"
        )
    point = str(sae.cfg.metadata.extra.get("hf_hook_point") or sae.cfg.metadata.hook_name)
    layer = layer_index(point)
    if layer is not None and not 0 <= layer < lm.n_layers:
        raise StartupError(f"sae: hook point {point} is out of range for a {lm.n_layers}-layer model")
    sae = sae.to(lm.device)

    det_dir = folder / "detectors"
    valid = available_detectors(det_dir) if det_dir.is_dir() else []
    try:
        report = settings.detectors if settings.detectors is not None else shipped_detectors(det_dir)
    except DetectorError as e:
        raise StartupError(f"detectors: {e}") from None
    unknown = [n for n in report if n not in valid]
    if unknown:
        raise StartupError(
            f"detectors: unknown detector(s) {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
        )
    try:  # every spec, so a reloaded policy may use any of them; a broken one stops start-up
        dets: dict[str, Detector] = load_detectors(valid, det_dir, sae, model=lm.model)
    except DetectorError as e:
        raise StartupError(f"detectors: {e}") from None
    return Parts(lm, sae, folder, DetectorSet.build(dets, report, label_fn(folder)), valid)


def load_runtime(settings: Settings) -> Runtime:
    parts = load_parts(settings)
    lm, sae, folder, dset, valid = parts.lm, parts.sae, parts.folder, parts.dset, parts.valid

    try:
        holder = PolicyHolder(settings.policy_path(), set(valid), validate=policy_issues(dset))
    except PolicyError as e:
        raise StartupError("policy: " + "; ".join(str(i) for i in e.issues)) from None

    monitor_sae = sae if settings.monitoring else None
    gen = Generator(lm.model, lm.tokenizer, monitor_sae)
    engine = Engine(
        gen,
        dset if settings.monitoring else None,
        max_batch=settings.max_batch_size,
        max_queue=settings.max_queue,
        batch_wait_s=settings.batch_wait_ms / 1000.0,
        special_ids=set(lm.tokenizer.all_special_ids),
    )
    ctx = getattr(lm.model.config, "max_position_embeddings", None)
    max_prompt = min(settings.max_prompt_tokens, int(ctx)) if ctx else settings.max_prompt_tokens
    rt = Runtime(settings, lm, monitor_sae, folder, dset, holder, engine, max_prompt)
    rt.versions = _versions(settings, lm, folder)
    engine.start()
    if settings.policy_poll_s > 0 and settings.policy_source == "file":  # redis: monitor.policy_sync
        rt.watcher = holder.watch(settings.policy_poll_s)
    return rt


def _versions(settings: Settings, lm: Any, folder: Path) -> dict[str, str]:
    from monitor.versions import model_versions

    return model_versions(lm.name, lm.source, settings.sae, folder, settings.resolved_data_dir())
