"""Per-token features for corpus records: residuals (and SAE latents) over a record's scoped tokens.

Scope of a chat record (`messages`) whose last message is the assistant's:
  prompt     = the tokens the model reads before answering: the chat minus its last message, rendered
               with the generation prompt (sae_assets.text.chat_token_ids, add_generation_prompt=True);
  completion = the assistant's own tokens after that prefix, without the template's end-of-turn suffix
               (found by rendering the same chat with an empty last message), i.e. what the model
               generated; both = prompt + completion.
A chat ending in another role is a prompt only (rendered with the generation prompt, as it is served);
asking for its completion is an error. A `text` record is one span: every scope reads all of it.
By default special tokens and position 0 are left out, as in SAE training (sae_assets.collect.keep_mask):
their activations are outliers (attention sinks).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from detectors.base import TokenFeatures
from detectors.errors import DetectorError
from detectors.spec import Scope
from sae_assets.hooks import hf_hook_point, run_to_hooks
from sae_assets.sae import SAE
from sae_assets.text import chat_token_ids, record_token_ids

Pool = Literal["max", "mean"]


def sae_hook_point(sae: SAE) -> str:
    """The HF module path an SAE reads (metadata `hf_hook_point`, else its SAELens hook name)."""
    point = sae.cfg.metadata.extra.get("hf_hook_point") or sae.cfg.metadata.hook_name
    if not point:
        raise DetectorError("the SAE's cfg.json names no hook point (metadata.hook_name / hf_hook_point)")
    return hf_hook_point(str(point))


def _is_prefix(prefix: list[int], full: list[int]) -> bool:
    return full[: len(prefix)] == prefix


def _last_turn_span(tokenizer: Any, msgs: list[dict[str, str]]) -> tuple[list[int], int, int]:
    """(ids of the whole chat, start, stop) of the last (assistant) message's own tokens."""
    full = chat_token_ids(tokenizer, msgs, add_generation_prompt=False)
    prefix = chat_token_ids(tokenizer, msgs[:-1], add_generation_prompt=True)
    if not _is_prefix(prefix, full):
        raise DetectorError(
            "the chat template does not render the conversation as prompt + answer "
            "(the generation-prompt rendering is not a prefix of the full one)"
        )
    empty = chat_token_ids(tokenizer, [*msgs[:-1], {**msgs[-1], "content": ""}], add_generation_prompt=False)
    suffix = empty[len(prefix) :] if _is_prefix(prefix, empty) else []
    stop = len(full)
    if suffix and full[-len(suffix) :] == suffix and stop - len(suffix) >= len(prefix):
        stop -= len(suffix)
    return full, len(prefix), stop


def scope_span(tokenizer: Any, record: dict[str, Any], scope: Scope) -> tuple[list[int], int, int]:
    """(token ids the model reads for this record, start, stop): the scope is ids[start:stop]."""
    msgs = record.get("messages")
    if isinstance(msgs, list) and msgs:
        if msgs[-1].get("role") == "assistant":
            ids, start, stop = _last_turn_span(tokenizer, msgs)
            spans = {"prompt": (0, start), "completion": (start, stop), "both": (0, stop)}
            lo, hi = spans[scope]
            return ids, lo, hi
        if scope == "completion":
            raise DetectorError("record has no assistant message last, so there is no completion to score")
        ids = chat_token_ids(tokenizer, msgs, add_generation_prompt=True)
        return ids, 0, len(ids)
    ids = record_token_ids(tokenizer, record)  # raises RecordError for a malformed record
    return ids, 0, len(ids)


def scoped_positions(
    tokenizer: Any, record: dict[str, Any], scope: Scope, drop_special: bool = True
) -> tuple[list[int], list[int]]:
    """(all token ids, positions in scope), the positions without special tokens / position 0 if asked."""
    ids, start, stop = scope_span(tokenizer, record, scope)
    return ids, kept_positions(tokenizer, ids, start, stop, drop_special)


def kept_positions(
    tokenizer: Any, ids: list[int], start: int, stop: int, drop_special: bool = True
) -> list[int]:
    """Positions start..stop-1 of `ids`, without special tokens and position 0 when `drop_special`."""
    special = set(tokenizer.all_special_ids) if drop_special else set()
    return [p for p in range(start, stop) if not (drop_special and (p == 0 or ids[p] in special))]


def iter_token_features(
    model: Any,
    tokenizer: Any,
    records: Iterable[dict[str, Any]],
    hook_points: Sequence[str] = (),
    *,
    scope: Scope = "completion",
    sae: SAE | None = None,
    latent_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    drop_special: bool = True,
) -> Iterator[TokenFeatures]:
    """One TokenFeatures per record (its scoped tokens), in order. With `sae`, latents are encoded at the
    SAE's hook point: `latent_ids` only (watched fast path), or all of them when None. Each forward pass
    stops after the deepest hook point (run_to_hooks)."""
    if not hook_points and sae is None:
        raise DetectorError("nothing to extract: give hook_points and/or an SAE")
    ids_all = list(range(sae.d_sae)) if sae is not None and latent_ids is None else list(latent_ids or [])
    batch: list[tuple[list[int], list[int]]] = []
    for rec in records:
        batch.append(scoped_positions(tokenizer, rec, scope, drop_special))
        if len(batch) == batch_size:
            yield from batch_token_features(model, batch, hook_points, sae=sae, latent_ids=ids_all)
            batch = []
    if batch:
        yield from batch_token_features(model, batch, hook_points, sae=sae, latent_ids=ids_all)


def batch_token_features(
    model: Any,
    batch: Sequence[tuple[list[int], list[int]]],
    hook_points: Sequence[str] = (),
    *,
    sae: SAE | None = None,
    latent_ids: Sequence[int] | None = (),
) -> list[TokenFeatures]:
    """TokenFeatures for already tokenized records, (token ids, kept positions) each, in one forward pass
    that stops after the deepest hook point. With `sae`, `latent_ids` are encoded at its hook point (None:
    every latent, one full encode)."""
    points = [hf_hook_point(p) for p in hook_points]
    sae_point = sae_hook_point(sae) if sae is not None else None
    capture = list(dict.fromkeys([*points, *([sae_point] if sae_point else [])]))
    if not capture:
        raise DetectorError("nothing to extract: give hook_points and/or an SAE")
    watch = list(range(sae.d_sae)) if sae is not None and latent_ids is None else list(latent_ids or ())
    # Right padding: with causal attention, real tokens never attend to the pads after them.
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, (ids, _) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    acts = run_to_hooks(model, capture, input_ids=input_ids.to(device), attention_mask=mask.to(device))
    # Every kept token of every record gathered at once: one copy to the host per hook point and one SAE
    # encode per batch, not one per record (on a GPU the per-record syncs cost more than the forward pass).
    lengths = [len(pos) for _, pos in batch]
    rows = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(lengths)).to(device)  # (ΣT,)
    cols = torch.tensor([p for _, pos in batch for p in pos], dtype=torch.long, device=device)  # (ΣT,)
    with torch.inference_mode():
        resid = {p: acts[p][rows, cols].float().cpu() for p in points}  # each (ΣT, d_in)
        lat = None
        if sae is not None and sae_point is not None:
            h = acts[sae_point][rows, cols].to(sae.W_enc.device)  # (ΣT, d_in)
            lat = sae.encode(h) if latent_ids is None else sae.encode_watched(h, watch)
            lat = lat.float().cpu()  # (ΣT, n_watched)
    split = {p: torch.split(v, lengths) for p, v in resid.items()}
    lat_split = torch.split(lat, lengths) if lat is not None else None
    # Clone outside inference mode so callers get ordinary tensors.
    return [
        TokenFeatures(
            resid={p: split[p][i].clone() for p in points},
            latents=None if lat_split is None else lat_split[i].clone(),
            latent_ids=watch if sae is not None else [],
        )
        for i in range(len(batch))
    ]


# ---- pooling ----------------------------------------------------------------------------------------------
def _pool(x: Tensor, pool: Pool) -> Tensor:
    if x.shape[0] == 0:
        raise DetectorError("a record has no tokens in scope; cannot pool its features")
    return x.max(dim=0).values if pool == "max" else x.mean(dim=0)


def pooled_resid(
    features: Iterable[TokenFeatures], hook_points: Sequence[str], pool: Pool = "mean"
) -> Tensor:
    """(N, n_points · d_in): per record, the residuals at `hook_points` (concatenated in order), pooled."""
    rows = [_pool(torch.cat([f.resid_at(p).float() for p in hook_points], dim=1), pool) for f in features]
    return torch.stack(rows) if rows else torch.zeros(0, 0)


def pooled_latents(features: Iterable[TokenFeatures], pool: Pool = "max") -> Tensor:
    """(N, n_latents): per record, each latent's max (or mean) activation over its scoped tokens."""
    rows = []
    for f in features:
        if f.latents is None:
            raise DetectorError("features carry no SAE latents; extract them with an SAE")
        rows.append(_pool(f.latents.float(), pool))
    return torch.stack(rows) if rows else torch.zeros(0, 0)


def token_rows(features: Iterable[TokenFeatures], hook_points: Sequence[str]) -> Tensor:
    """(Σ T, n_points · d_in): every scoped token of every record, for token-level probe training."""
    rows = [torch.cat([f.resid_at(p).float() for p in hook_points], dim=1) for f in features]
    return torch.cat(rows) if rows else torch.zeros(0, 0)
