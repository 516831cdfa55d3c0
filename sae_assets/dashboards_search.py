"""Find latents two ways: words matching stored dashboards' labels and top / promoted tokens
(`search_labels`), or a text run through the model with latents ranked by their peak on it
(`top_latents_for_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sae_assets.collect import keep_mask
from sae_assets.dashboards import Dashboards
from sae_assets.dashboards_build import sig3, token_namer
from sae_assets.dashboards_stats import MASSIVE_RATIO, special_ids
from sae_assets.hooks import hf_hook_point, run_to_hooks
from sae_assets.sae import SAE


# ---- search ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelHit:
    latent: int
    score: float
    label: str
    label_source: str
    matched: str  # why it matched, e.g. "top token 'bank'"
    density: float
    max_act: float


def _token_score(q: str, tokens: Sequence[str], exact: float, partial: float, what: str) -> tuple[float, str]:
    """Best match of `q` among ranked tokens: exact (stripped, case-insensitive) beats substring."""
    best, why = 0.0, ""
    for rank, tok in enumerate(tokens):
        t = tok.strip().lower()
        score = exact if t == q else partial if q in t and len(q) >= 2 else 0.0
        score -= 0.05 * rank * (score > 0)
        if score > best:
            best, why = score, f"{what} {tok!r}"
    return best, why


def _match(q: str, label: str, manual: bool, tops: Sequence[str], proms: Sequence[str]) -> tuple[float, str]:
    scores = [
        _token_score(q, tops, 3.0, 1.5, "top token"),
        _token_score(q, proms, 2.0, 1.0, "promotes"),
        # Auto labels only restate the tokens scored above; a human's words are worth matching.
        (4.0, "manual label") if manual and q in label.lower() else (0.0, ""),
    ]
    total = sum(s for s, _ in scores)
    return total, "; ".join(w for s, w in scores if s > 0)


def search_labels(dash: Dashboards, query: str, limit: int = 20) -> list[LabelHit]:
    """Latents whose manual label, top activating tokens or promoted tokens match `query`, best first.
    A multi-word query that matches nothing whole is scored word by word (at half weight)."""
    q = query.strip().lower()
    if not q:
        return []
    idx = dash.index
    hits = []
    for i in range(len(dash)):
        label, source = dash.label(i)
        args = (label, source == "manual", idx["top_tokens"][i], idx["promoted"][i])
        score, why = _match(q, *args)
        if score == 0 and len(q.split()) > 1:
            parts = [_match(w, *args) for w in q.split()]
            score, why = 0.5 * sum(s for s, _ in parts), "; ".join(w for s, w in parts if s > 0)
        if score > 0:
            hits.append(LabelHit(i, score, label, source, why, idx["density"][i], idx["max_act"][i]))
    hits.sort(key=lambda h: (-h.score, -h.max_act))
    return hits[:limit]


@dataclass(frozen=True)
class TextHit:
    latent: int
    act: float  # the latent's max activation over the text's scored tokens
    position: int  # token index (in the ids that were run) where it peaks
    token: str


def text_token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's ids, after an EOS when the tokenizer adds no BOS: position 0 is never scored (as in
    training), and in packed training contexts a record follows an EOS, so this mirrors that."""
    ids = list(tokenizer(text)["input_ids"])
    sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if sep is not None and (not ids or ids[0] not in special_ids(tokenizer)):
        ids = [sep, *ids]
    return ids


def top_latents_for_text(
    model: Any, tokenizer: Any, sae: SAE, hook_point: str, text: str, limit: int = 10
) -> list[TextHit]:
    """Runs `text` (early exit at the hook) and returns latents ranked by their max activation on it."""
    point = hf_hook_point(hook_point)
    ids = torch.tensor([text_token_ids(tokenizer, text)], device=next(model.parameters()).device)  # (1, T)
    h = run_to_hooks(model, [point], input_ids=ids)[point].to(sae.W_enc.device)  # (1, T, d_in)
    mask = keep_mask(ids, special_ids(tokenizer), h, MASSIVE_RATIO).to(sae.W_enc.device)
    with torch.inference_mode():
        f = (sae.encode(h).float() * mask[..., None])[0]  # (T, d_sae)
    peak, pos = f.max(dim=0)  # (d_sae,)
    top = peak.topk(min(limit, sae.d_sae))
    name = token_namer(tokenizer)
    flat = ids[0].tolist()
    return [
        TextHit(i, sig3(v), int(pos[i]), name(flat[int(pos[i])]))
        for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        if v > 0
    ]
