"""The scoring contract shared by `featurewatch score` and the server's shadow mode.

Input record: `id` plus `text` or `messages` (OpenAI chat format). For a chat whose last message is the
assistant's, that message is the monitored completion and the earlier turns are the prompt; each
detector aggregates its spec's scope (normally the completion). A chat ending in another role is a prompt
only: every detector scores the prompt. A `text` record is one span that every scope reads whole.

Output per record, in input order:
  {"id", "scope": "completion"|"prompt"|"text", "tokens": n (scored tokens of that span),
   "scores": {detector: value in [0, 1]}, "fired": {detector: value >= spec threshold},
   "top_features": {detector: [{latent_id, label, activation, contribution, token_index, token}]}}
`contribution` is how much the latent pushed the score up: w·f for `sae_features`, for a probe its share of
the logit read through the SAE decoder (detectors.attribution); `activation` and `token_index` are at the
token where its push counted most. `token_index` counts the detector's scored tokens from 0 (special
tokens and position 0 are never scored).
A record that cannot be scored yields {"id", "error": "line N: …"} instead; nothing is dropped.
With `token_scores=True` (the server's shadow mode) each result also has `n_prompt` (scored rows before the
completion), `token_texts` and `token_scores` {detector: [score per scored row]}, prompt rows first.
With `stream_from=N` each result also has `stream_peaks` {detector: the highest running aggregate over
its scope from token N on} (detectors.aggregate.stream_peak: what a mid-stream rule with min_tokens N sees).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from detectors.aggregate import aggregate, stream_peak
from detectors.base import Detector, TokenFeatures, fires, wants_all_latents
from detectors.errors import DetectorError
from detectors.extract import batch_token_features, kept_positions, scope_span
from sae_assets.sae import SAE
from sae_assets.text import RecordError

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class Malformed:
    """An input line that is not a record (bad JSON, empty line); scored as an error in its place."""

    message: str
    id: Any = None


@dataclass
class _Prepared:
    """A record ready for the batched forward pass: its rendered ids and scored positions."""

    id: Any
    record: dict[str, Any]
    ids: list[int]
    positions: list[int]  # kept positions of the whole record (iter_token_features' rows, in order)
    n_prompt: int  # how many of them lie before the completion (0 when there is no completion)
    kind: str  # "completion", "prompt" or "text"


def check_record(rec: Any) -> str | None:
    """Why `rec` cannot be scored, or None. Checked before tokenizing so messages stay specific."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if rec.get("id") is None:
        return "missing field `id`"
    msgs = rec.get("messages")
    if msgs is not None:
        if not isinstance(msgs, list) or not msgs:
            return "`messages` must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be an object with a string `content`"
            if m.get("role") not in ROLES:
                return f"messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)}"
        return None
    if not isinstance(rec.get("text"), str):
        return "record has neither a `messages` list nor a `text` string"
    return None


class Scorer:
    """Scores records with a set of detectors: one early-exit forward pass per batch, reading the union
    of the detectors' hook points and (through the SAE) the union of their latents."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        sae: SAE | None,
        detectors: dict[str, Detector],
        labels: Callable[[int], str] | None = None,
        *,
        top_k: int = 5,
        max_tokens: int | None = None,
        token_scores: bool = False,
        stream_from: int | None = None,
    ) -> None:
        if not detectors:
            raise DetectorError("no detectors to score with")
        self.model, self.tokenizer, self.detectors = model, tokenizer, detectors
        self.labels, self.top_k, self.token_scores = labels, top_k, token_scores
        if stream_from is not None and stream_from < 1:
            raise DetectorError(f"stream_from must be ≥ 1, got {stream_from}")
        self.stream_from = stream_from
        self.points = list(dict.fromkeys(p for d in detectors.values() for p in d.hook_points()))
        self.latent_ids = sorted({i for d in detectors.values() for i in d.latent_ids()})
        if self.latent_ids and sae is None:
            raise DetectorError(f"detectors read SAE latents {self.latent_ids[:8]}… but no SAE was given")
        # Top features of a residual probe need every latent (one full encode per batch, ~9 ms per 128
        # tokens for 9,216 latents on 2 CPU cores); without latents to watch or attribute the SAE is not run
        # at all (its hook point may even be deeper).
        attributing = any(wants_all_latents(d) for d in detectors.values())
        self.all_latents = top_k > 0 and sae is not None and attributing
        self.sae = sae if self.latent_ids or self.all_latents else None
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_tokens = max_tokens or (int(limit) if limit else None)
        self._names: dict[int, str] = {}

    # ---- preparation ----
    def _prepare(self, rec: dict[str, Any]) -> _Prepared:
        msgs = rec.get("messages")
        kind = "text"
        if isinstance(msgs, list) and msgs:
            kind = "completion" if msgs[-1].get("role") == "assistant" else "prompt"
        # One rendering per record: the completion span also gives "both" (= ids[:stop]).
        ids, start, stop = scope_span(self.tokenizer, rec, "completion" if kind == "completion" else "both")
        if kind != "completion":
            start = 0
        if not ids:
            raise DetectorError("record renders to no tokens")
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise DetectorError(f"record renders to {len(ids)} tokens, more than the limit {self.max_tokens}")
        positions = kept_positions(self.tokenizer, ids, 0, stop)
        n_prompt = sum(1 for p in positions if p < start)
        return _Prepared(rec["id"], rec, ids, positions, n_prompt, kind)

    def _token(self, i: int) -> str:
        if i not in self._names:
            self._names[i] = self.tokenizer.decode([i])
        return self._names[i]

    # ---- scoring ----
    def _span(self, prep: _Prepared, feats: TokenFeatures, scope: str) -> tuple[TokenFeatures, int]:
        """The detector's scoped rows and the offset of its first row among the record's rows."""
        n = feats.n_tokens
        if prep.kind != "completion" or scope == "both":
            return feats, 0
        if scope == "completion":
            return feats.slice(prep.n_prompt, n), prep.n_prompt
        return feats.slice(0, prep.n_prompt), 0

    def _result(self, prep: _Prepared, feats: TokenFeatures) -> dict[str, Any]:
        scores: dict[str, float] = {}
        fired: dict[str, bool] = {}
        top: dict[str, list[dict[str, Any]]] = {}
        peaks: dict[str, float] = {}
        for name, det in self.detectors.items():
            span, offset = self._span(prep, feats, det.spec.scope)
            tokens = det.score_tokens(span)  # once: the message value and the stream peak read the same
            value = aggregate(tokens, det.spec.aggregation)
            scores[name], fired[name] = value, fires(det, value)
            if self.stream_from is not None:
                peaks[name] = stream_peak(tokens, det.spec.aggregation, self.stream_from)
            top[name] = [self._evidence(prep, item, offset) for item in det.top_features(span, self.top_k)]
        n_scored = feats.n_tokens - prep.n_prompt if prep.kind == "completion" else feats.n_tokens
        out = {
            "id": prep.id,
            "scope": prep.kind,
            "tokens": n_scored,
            "scores": scores,
            "fired": fired,
            "top_features": top,
        }
        if self.stream_from is not None:
            out["stream_peaks"] = peaks
        if self.token_scores:  # per-token evidence over every scored row, prompt rows first
            out["n_prompt"] = prep.n_prompt
            out["token_texts"] = [self._token(prep.ids[p]) for p in prep.positions]
            out["token_scores"] = {
                name: [float(x) for x in det.score_tokens(feats).tolist()]
                for name, det in self.detectors.items()
            }
        return out

    def _evidence(self, prep: _Prepared, item: dict[str, Any], offset: int) -> dict[str, Any]:
        lat, t = int(item["latent_id"]), int(item["token_index"])
        label = item.get("label") or (self.labels(lat) if self.labels is not None else "")
        return {
            "latent_id": lat,
            "label": label,
            "activation": float(item["activation"]),
            "contribution": float(item.get("contribution", item["activation"])),
            "token_index": t,
            "token": self._token(prep.ids[prep.positions[offset + t]]),
        }

    def _run(self, batch: list[_Prepared]) -> list[dict[str, Any]]:
        feats = batch_token_features(  # one forward pass for the whole batch, ids rendered once in _prepare
            self.model,
            [(p.ids, p.positions) for p in batch],
            self.points,
            sae=self.sae,
            latent_ids=None if self.all_latents else self.latent_ids,
        )
        return [self._result(p, f) for p, f in zip(batch, feats, strict=True)]

    def score_records(
        self, records: Iterable[Any], batch_size: int = 8, *, start_line: int = 1
    ) -> Iterator[dict[str, Any]]:
        """One result per input item, in order. Item i is reported as line `start_line + i`; a `Malformed`
        item (or any record that fails to render) becomes an error result at its place."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        chunk: list[tuple[int, Any]] = []
        for lineno, item in enumerate(records, start_line):
            chunk.append((lineno, item))
            if len(chunk) == batch_size:
                yield from self._score_chunk(chunk)
                chunk = []
        if chunk:
            yield from self._score_chunk(chunk)

    def _score_chunk(self, chunk: list[tuple[int, Any]]) -> Iterator[dict[str, Any]]:
        slots: list[dict[str, Any] | _Prepared] = []
        for lineno, item in chunk:
            slots.append(self._prepare_or_error(lineno, item))
        ready = [s for s in slots if isinstance(s, _Prepared)]
        results = iter(self._run(ready) if ready else [])
        for s in slots:
            yield next(results) if isinstance(s, _Prepared) else s

    def _prepare_or_error(self, lineno: int, item: Any) -> dict[str, Any] | _Prepared:
        if isinstance(item, Malformed):
            return {"id": item.id, "error": f"line {lineno}: {item.message}"}
        problem = check_record(item)
        rid = item.get("id") if isinstance(item, dict) else None
        if problem is None:
            try:
                return self._prepare(item)
            except Exception as e:
                # Chat templates raise their own errors (jinja2, role order …): report them, never crash.
                known = isinstance(e, DetectorError | RecordError)
                problem = str(e) if known else f"{type(e).__name__}: {e}"
        return {"id": rid, "error": f"line {lineno}: {problem}"}
