"""The scoring contract: completion-only scores, per-detector scopes, batch independence, errors in place."""

from __future__ import annotations

from typing import Any

import pytest
from sae_testing import tiny_sae

from detectors.base import score_message
from detectors.errors import DetectorError
from detectors.extract import iter_token_features
from detectors.sae_features import SaeFeaturesDetector
from detectors.scoring import Malformed, Scorer, check_record
from detectors.spec import LatentSpec, SaeFeaturesSpec
from sae_assets.sae import SAE

ANSWER = "Please verify your bank account password at this link."
CHAT = {
    "id": "chat-1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write a haiku about the moon."},
        {"role": "assistant", "content": ANSWER},
    ],
}
PROMPT_ONLY = {"id": "p-1", "messages": [{"role": "user", "content": "The quick brown fox."}]}
TEXT = {"id": 7, "text": "Paris is the capital of France."}


def _sae() -> SAE:
    return tiny_sae()


def _det(name: str, scope: str = "completion") -> SaeFeaturesDetector:
    spec = SaeFeaturesSpec(
        name=name,
        scope=scope,  # type: ignore[arg-type]
        threshold=0.5,
        latents=[LatentSpec(id=3, weight=1.0, label="three"), LatentSpec(id=9, weight=0.5)],
        bias=-0.5,
    )
    return SaeFeaturesDetector(spec)


@pytest.fixture(scope="module")
def scorer(tiny_lm: Any) -> Scorer:
    dets = {"comp": _det("comp"), "prompt": _det("prompt", "prompt"), "both": _det("both", "both")}
    return Scorer(tiny_lm.model, tiny_lm.tokenizer, _sae(), dets, labels=lambda i: f"L{i}", top_k=3)


def test_completion_score_reads_only_the_assistant_turn(tiny_lm: Any, scorer: Scorer) -> None:
    out = next(scorer.score_records([CHAT]))
    tok = tiny_lm.tokenizer
    feats = next(
        iter_token_features(tiny_lm.model, tok, [CHAT], scope="completion", sae=scorer.sae, latent_ids=[3, 9])
    )
    assert out["id"] == "chat-1" and out["scope"] == "completion"
    assert out["tokens"] == feats.n_tokens == len(tok(ANSWER, add_special_tokens=False)["input_ids"])
    assert out["scores"]["comp"] == pytest.approx(score_message(_det("x"), feats), abs=1e-6)
    assert set(out["scores"]) == set(out["fired"]) == set(out["top_features"]) == {"comp", "prompt", "both"}
    assert out["scores"]["prompt"] != pytest.approx(out["scores"]["comp"])
    for name, value in out["scores"].items():
        assert 0.0 <= value <= 1.0 and out["fired"][name] == (value >= 0.5)
    for item in out["top_features"]["comp"]:  # evidence comes from completion tokens only
        assert set(item) == {"latent_id", "label", "activation", "contribution", "token_index", "token"}
        assert item["token"] in ANSWER and 0 <= item["token_index"] < out["tokens"]
        assert item["label"] == ("three" if item["latent_id"] == 3 else "L9")


def test_prompt_only_and_text_records_score_the_whole_span(scorer: Scorer) -> None:
    prompt, text = list(scorer.score_records([PROMPT_ONLY, TEXT]))
    assert prompt["scope"] == "prompt" and text["scope"] == "text" and text["id"] == 7
    # Without a completion every detector reads the same span, whatever its scope.
    assert len({round(v, 9) for v in prompt["scores"].values()}) == 1
    assert len({round(v, 9) for v in text["scores"].values()}) == 1


def test_batches_do_not_change_scores(scorer: Scorer) -> None:
    recs = [CHAT, TEXT, PROMPT_ONLY, {**TEXT, "id": 8, "text": "The lazy dog."}]
    one = list(scorer.score_records(recs, batch_size=1))
    many = list(scorer.score_records(recs, batch_size=4))
    assert [r["id"] for r in many] == ["chat-1", 7, "p-1", 8]
    for a, b in zip(one, many, strict=True):
        assert a["tokens"] == b["tokens"]
        for k in a["scores"]:
            assert a["scores"][k] == pytest.approx(b["scores"][k], abs=1e-5)


def test_malformed_records_become_errors_in_place(scorer: Scorer) -> None:
    items = [
        CHAT,
        Malformed("invalid JSON: Expecting value (column 1)"),
        {"text": "no id"},
        {"id": "r", "messages": [{"role": "robot", "content": "hi"}]},
        {"id": "e", "messages": []},
        [1, 2],
        TEXT,
        {"id": "z", "text": ""},
    ]
    out = list(scorer.score_records(items, batch_size=3))
    assert len(out) == len(items)
    assert "scores" in out[0] and "scores" in out[6]
    assert out[1] == {"id": None, "error": "line 2: invalid JSON: Expecting value (column 1)"}
    assert out[2]["error"] == "line 3: missing field `id`"
    assert out[3]["id"] == "r" and out[3]["error"].startswith("line 4: messages[0].role 'robot'")
    assert out[4]["error"].startswith("line 5: `messages` must be a non-empty list")
    assert out[5]["error"].startswith("line 6: expected a JSON object")
    assert out[7] == {"id": "z", "error": "line 8: record renders to no tokens"}
    assert check_record(CHAT) is None


def test_scorer_needs_an_sae_for_latent_detectors(tiny_lm: Any) -> None:
    with pytest.raises(DetectorError, match="no SAE"):
        Scorer(tiny_lm.model, tiny_lm.tokenizer, None, {"comp": _det("comp")})
    with pytest.raises(DetectorError, match="no detectors"):
        Scorer(tiny_lm.model, tiny_lm.tokenizer, _sae(), {})


def test_stream_peaks_read_each_detectors_own_span(tiny_lm: Any) -> None:
    """stream_from=N adds each detector's highest running aggregate over its scoped tokens from token N
    on: for max it is the final value; for a mean it is at least the final value."""
    from detectors.aggregate import Aggregation, stream_peak

    mean = _det("mean")
    mean.spec = mean.spec.model_copy(update={"aggregation": Aggregation(kind="mean")})
    dets = {"max": _det("max"), "mean": mean, "prompt": _det("prompt", "prompt")}
    sc = Scorer(tiny_lm.model, tiny_lm.tokenizer, _sae(), dets, top_k=0, stream_from=3)
    out = next(sc.score_records([CHAT]))
    assert out["stream_peaks"]["max"] == pytest.approx(out["scores"]["max"], abs=1e-9)
    assert out["stream_peaks"]["mean"] >= out["scores"]["mean"] - 1e-9
    feats = next(
        iter_token_features(
            tiny_lm.model, tiny_lm.tokenizer, [CHAT], scope="prompt", sae=sc.sae, latent_ids=[3, 9]
        )
    )
    want = stream_peak(dets["prompt"].score_tokens(feats), dets["prompt"].spec.aggregation, 3)
    assert out["stream_peaks"]["prompt"] == pytest.approx(want, abs=1e-6)
    assert "stream_peaks" not in next(
        Scorer(tiny_lm.model, tiny_lm.tokenizer, _sae(), dets).score_records([CHAT])
    )
    with pytest.raises(DetectorError, match="stream_from"):
        Scorer(tiny_lm.model, tiny_lm.tokenizer, _sae(), dets, stream_from=0)
