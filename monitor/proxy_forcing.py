"""Proxy mode: read a text generated elsewhere through the local model, a few tokens at a time.

`TeacherForcer` feeds the prompt, then each batch of settled completion tokens, through the local model
with its own KV cache (so each token costs one incremental step, not a re-read of the whole text), and
stops every pass at the deepest layer a detector or the SAE reads (early exit, as shadow scoring does:
the LM head and the later blocks never run). Its activations are the generator's for the same tokens, so
the same `RequestMonitor` scores them and the same policy decides.

Engine thread only: the SAE and capture hooks sit on the shared model's modules, so these functions run
inside `CallJob`s (`monitor.proxy` submits them), never on the event loop.
"""

from __future__ import annotations

import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from typing import Any

import torch

from monitor.generate import _cache_kwarg
from monitor.monitoring import RequestMonitor
from monitor.proxy_tokens import Settled
from policies.evaluate import Verdict
from sae_assets.hooks import EarlyExit, LatentWatch, capture, hf_hook_point, sae_hooks
from sae_assets.sae import SAE


class MonitorContextFull(RuntimeError):
    """The text no longer fits the local model's context: the rest cannot be monitored."""


@dataclass(frozen=True)
class Observed:
    """What one monitoring step decided: how many of its tokens were scored, and whether the last of
    them was blocked (then it is the trigger and must not be sent)."""

    scored: int
    blocked: bool


class TeacherForcer:
    def __init__(
        self,
        model: Any,
        sae: SAE | None,
        sae_point: str | None,
        points: list[str],
        latent_ids: list[int],
        max_positions: int | None,
        watch_all: bool = False,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.watch = (
            LatentWatch(sae, list(latent_ids), full=watch_all) if sae is not None and sae_point else None
        )
        self.watch_all = watch_all
        self.latest_full: torch.Tensor | None = None  # (T, d_sae) of the last forward, with watch_all
        self.sae_point = hf_hook_point(sae_point) if self.watch is not None and sae_point else None
        self.points = [hf_hook_point(p) for p in points]
        reads = [*self.points, *([self.sae_point] if self.sae_point else [])]
        # Only the deepest point needs a capture hook to stop the pass; the others are read anyway.
        self.capture = list(dict.fromkeys(reads))
        self.max_positions = max_positions
        self.pos = 0  # tokens in the KV cache
        self.seconds = 0.0  # forward time: in proxy mode every pass is monitoring overhead
        self._cache: Any = None
        self._cache_kw = _cache_kwarg(model)

    def forward(
        self, ids: list[int], all_latents: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Feed `ids` after everything fed so far. Returns watched latents (T, n_watched) and residuals
        {point: (T, d_in)}, CPU float32, T = len(ids); with watch_all and `all_latents`, `latest_full` holds
        every latent (T, d_sae) (not for the prompt: a long one's would be large and is never read)."""
        if self.watch is not None:
            self.watch.full = self.watch_all and all_latents
        if self.max_positions is not None and self.pos + len(ids) > self.max_positions:
            raise MonitorContextFull(f"the monitor model's context of {self.max_positions} tokens is full")
        t0 = time.perf_counter()
        try:
            return self._forward(ids)
        finally:
            self.seconds += time.perf_counter() - t0

    def _forward(self, ids: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(ids)
        if not self.capture:  # no detector reads anything: nothing to compute
            self.pos += n
            return torch.zeros((n, 0)), {}
        if self._cache is None:
            from transformers import DynamicCache

            self._cache = DynamicCache(config=self.model.config)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        pos = torch.arange(self.pos, self.pos + n, device=self.device)[None]  # (1, T)
        hooks = (
            sae_hooks(self.model, self.sae_point, watch=self.watch)
            if self.watch is not None and self.sae_point
            else nullcontext()
        )
        # The SAE hook is registered first, so at its layer it reads the residual before capture stops the
        # pass there. Layers past the deepest point never run, so their cache entries are never needed.
        with torch.inference_mode(), hooks, capture(self.model, self.capture, early_exit=True) as cap:
            with suppress(EarlyExit):
                self.model(input_ids=x, position_ids=pos, use_cache=True, **{self._cache_kw: self._cache})
            resid = {p: cap[p][0].float().cpu() for p in self.points}  # {point: (T, d_in)}
            lat = (
                self.watch.latest[0].float().cpu()  # (T, n_watched)
                if self.watch is not None and self.watch.latest is not None
                else torch.zeros((n, 0))
            )
            full = self.watch.latest_full if self.watch is not None else None
            self.latest_full = None if full is None else full[0].float().cpu().clone()  # (T, d_sae)
        self.pos += n
        return lat.clone(), {p: r.clone() for p, r in resid.items()}  # ordinary tensors, not inference ones


def observe_prompt(
    forcer: TeacherForcer, monitor: RequestMonitor, ids: list[int], special: set[int]
) -> Verdict:
    """Engine thread: the prompt's pass (it fills the KV cache) and the prompt-phase verdict."""
    lat, resid = forcer.forward(ids, all_latents=False)
    return monitor.observe_prompt(ids, lat, resid, special)


def observe_tokens(forcer: TeacherForcer, monitor: RequestMonitor, tokens: list[Settled]) -> Observed:
    """Engine thread: one pass over settled completion tokens, then each is scored in order, stopping at
    the first one a block verdict stops."""
    lat, resid = forcer.forward([t.token_id for t in tokens])
    full = forcer.latest_full
    for i, tok in enumerate(tokens):
        at = {p: r[i] for p, r in resid.items()}
        every = None if full is None else full[i]
        v = monitor.observe_token(len(monitor.tokens), tok.text, lat[i], at, every)
        if v.blocked:
            return Observed(i + 1, True)
    return Observed(len(tokens), False)
