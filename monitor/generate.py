"""Token-by-token generation with per-token monitoring, batched (left padding, per-sequence stop).

Every token is yielded only after the forward pass that consumed it, so its watched latents exist before
anyone sees it: a callback that answers "stop" keeps that token (and everything after) from being emitted.
That pass is the one that produces the next token's logits anyway, so monitoring adds no extra forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from sae_assets.hooks import LatentWatch, Steering, capture, hf_hook_point, sae_hooks
from sae_assets.sae import SAE

Decision = Literal["continue", "stop"]
FinishReason = Literal["stop", "length", "content_filter"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")


@dataclass(frozen=True)
class TokenEvent:
    row: int
    index: int  # position in the completion, from 0
    token_id: int
    text: str  # new text this token completes (may be "" while a multi-byte character is incomplete)
    latents: torch.Tensor  # (n_watched,) watched latent activations at this token, CPU float32
    full_latents: torch.Tensor | None = None  # (d_sae,) when the watch encodes all latents
    resid: dict[str, torch.Tensor] = field(default_factory=dict)  # {point: (d_in,)} CPU float32


@dataclass(frozen=True)
class PromptFeatures:
    """What the prefill pass saw of one prompt (its own tokens only, no padding)."""

    token_ids: list[int]
    latents: torch.Tensor  # (T, n_watched) CPU float32
    resid: dict[str, torch.Tensor] = field(default_factory=dict)  # {point: (T, d_in)} CPU float32


@dataclass
class SequenceResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0


OnToken = Callable[[TokenEvent], Decision | None]
OnPrompt = Callable[[int, PromptFeatures], Decision | None]


def _cache_kwarg(model: Any) -> str:
    """transformers ≥5.2x names the KV cache argument `cache`; older releases `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits: (vocab,) float32 -> token id."""
    if p.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class _Detok:
    """Incremental detokenisation: emits text only once it decodes to whole characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return ""
        new = full[len(self.text) :]
        self.text = full
        return new


class Generator:
    """Runs one batch of prompts to completion; the SAE hook reads watched latents and applies steering."""

    def __init__(
        self, model: Any, tokenizer: Any, sae: SAE | None = None, hook_point: str | None = None
    ) -> None:
        if sae is not None and hook_point is None:
            hook_point = sae.cfg.metadata.extra.get("hf_hook_point") or sae.cfg.metadata.hook_name
        self.model, self.tok, self.sae, self.hook_point = model, tokenizer, sae, hook_point
        self.device = next(model.parameters()).device
        self._cache_kw = _cache_kwarg(model)
        eos = tokenizer.eos_token_id
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            self.eos_ids |= {int(e) for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        self.pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))
        )

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        *,
        watch: Sequence[int] = (),
        watch_all: bool = False,
        steering: Steering | None = None,
        capture_points: Sequence[str] = (),
        on_token: OnToken | None = None,
        on_prompt: OnPrompt | None = None,
        results: list[SequenceResult] | None = None,
    ) -> Iterator[TokenEvent]:
        """Yield each emitted token. `results` (if given) is filled with one SequenceResult per prompt.

        `capture_points`: residual-stream hook points read at every position (after any steering at the
        SAE's point), handed to `on_prompt` and carried by each TokenEvent (for probe detectors).
        `steering` may be changed between tokens (e.g. by `on_token`); it applies from the next pass.
        """
        n = len(prompts)
        if n == 0:
            return
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        plist = list(params) if isinstance(params, Sequence) else [params] * n
        res = results if results is not None else []
        res[:] = [SequenceResult(prompt_tokens=len(p)) for p in prompts]
        # On the logits' device: multinomial refuses a CPU generator for CUDA probabilities.
        gens = [
            torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
            for p in plist
        ]
        # Every latent only from the first decode step on: token events never read the prompt's, and a long
        # prompt's (B, T, d_sae) would be large (8 × 8,192 tokens × 9,216 latents × 4 B = 2.4 GB).
        lw = LatentWatch(self.sae, list(watch), full=False) if self.sae is not None else None
        if self.sae is None and (watch or steering is not None):
            raise ValueError("watching or steering latents needs an SAE")
        ids, mask, pos = self._left_pad(prompts)
        detoks = [_Detok(self.tok) for _ in range(n)]
        active = [True] * n
        hooks = (
            sae_hooks(self.model, self.hook_point, watch=lw, steering=steering)
            if self.sae is not None and self.hook_point
            else _null()
        )
        points = [hf_hook_point(p) for p in capture_points]
        # Registered after the SAE hook, so the captured residual is the steered one the model computes with.
        with torch.inference_mode(), hooks, capture(self.model, points) as cap:
            cache = self._new_cache()
            logits = self._forward(ids, mask, pos, cache)  # (B, vocab) at the last position
            if lw is not None:
                lw.full = watch_all
            if on_prompt is not None:
                lat = self._step_latents(lw, None, n)
                resid = {p: cap[p].float().cpu() for p in points}  # (B, T, d_in)
                for row in range(n):
                    t = len(prompts[row])
                    feats = PromptFeatures(
                        list(prompts[row]), lat[row, -t:], {p: r[row, -t:] for p, r in resid.items()}
                    )
                    if on_prompt(row, feats) == "stop":
                        active[row], res[row].finish_reason = False, "content_filter"
            while any(active):
                next_ids = [
                    self._pick(row, logits[row], plist[row], gens[row], active, res) for row in range(n)
                ]
                if not any(active):
                    break
                new = torch.tensor(next_ids, device=self.device)[:, None]  # (B, 1)
                mask = torch.cat([mask, torch.ones_like(new)], dim=1)
                pos = pos[:, -1:] + 1
                logits = self._forward(new, mask, pos, cache)
                # One device->CPU copy per step for the whole batch, not one per row.
                lat = self._step_latents(lw, -1, n)  # (B, n_watched)
                full = (
                    lw.latest_full[:, -1].float().cpu()
                    if lw is not None and lw.latest_full is not None
                    else None
                )
                resid = {p: cap[p][:, -1].float().cpu() for p in points}  # {point: (B, d_in)}
                for row in range(n):
                    if not active[row]:
                        continue
                    ev = TokenEvent(
                        row=row,
                        index=len(res[row].token_ids),
                        token_id=next_ids[row],
                        text=detoks[row].push(next_ids[row]),
                        latents=lat[row],
                        full_latents=None if full is None else full[row],
                        resid={p: r[row] for p, r in resid.items()},
                    )
                    if on_token is not None and on_token(ev) == "stop":
                        active[row], res[row].finish_reason = False, "content_filter"
                        continue
                    r = res[row]
                    r.token_ids.append(ev.token_id)
                    r.text += ev.text
                    hit = next((s for s in plist[row].stop if s in r.text), None)
                    if hit is not None:
                        cut = r.text.index(hit)
                        ev = replace(ev, text=ev.text[: max(0, len(ev.text) - (len(r.text) - cut))])
                        r.text = r.text[:cut]
                        active[row], r.finish_reason = False, "stop"
                    elif len(r.token_ids) >= plist[row].max_tokens:
                        active[row], r.finish_reason = False, "length"
                    yield ev

    # ---- internals ---------------------------------------------------------------------------------------
    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1].float()  # (B, vocab)

    def _pick(
        self,
        row: int,
        logits: torch.Tensor,
        p: SamplingParams,
        gen: torch.Generator | None,
        active: list[bool],
        res: list[SequenceResult],
    ) -> int:
        if not active[row]:
            return self.pad_id
        tok = _sample(logits, p, gen)
        if tok in self.eos_ids:
            active[row], res[row].finish_reason = False, "stop"
            return self.pad_id
        return tok

    def _step_latents(self, lw: LatentWatch | None, last: int | None, n: int) -> torch.Tensor:
        """Watched latents of the latest pass on CPU: (B, n_watched) at `last`, else (B, T, n_watched)."""
        if lw is None or lw.latest is None:
            return torch.zeros((n, 0) if last is not None else (n, 0, 0))
        x = lw.latest[:, last] if last is not None else lw.latest
        return x.float().cpu()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def generate_text(
    gen: Generator, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(), **kw: Any
) -> SequenceResult:
    """Convenience: run one prompt to completion and return its result."""
    results: list[SequenceResult] = []
    for _ in gen.stream([prompt_ids], params, results=results, **kw):
        pass
    return results[0]
