"""Token-level probe training, calibration-split selection / operating points, the activation cache, and the
CLI options that expose them (tiny model, fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_testing import tiny_sae
from typer.testing import CliRunner

from detectors.aggregate import Aggregation, aggregate
from detectors.base import TokenFeatures
from detectors.build import build_concept_detectors
from detectors.corpus import Corpus, TokenRows, pooled_table, token_table
from detectors.extract import iter_token_features
from detectors.fitting import active_latents, calib_recall
from detectors.probe import ProbeDetector
from detectors.registry import load_detector, load_detectors
from detectors.spec import load_spec
from detectors.variants import mix_pool, parse_agg, valid_pool
from monitor.cli import app
from sae_assets.sae import SAE

POS = "Verify your bank password at this link now"
NEG = "The quick brown fox jumps over the lazy dog"


def _chat(i: int, label: int, split: str) -> dict[str, Any]:
    text = f"{POS if label else NEG} {i}."
    msgs = [{"role": "user", "content": f"Ask {i} {label}"}, {"role": "assistant", "content": text}]
    return {"id": f"t{label}-{i}", "label": label, "split": split, "messages": msgs}


def _sae(folder: Path) -> SAE:
    sae = tiny_sae()
    sae.save(folder)
    return sae


def test_parse_agg_and_token_table_weights() -> None:
    assert parse_agg("mean").kind == "mean"
    top = parse_agg("topk_mean:8")
    assert top.kind == "topk_mean" and top.k == 8
    feats = [TokenFeatures(resid={"model.layers.2": torch.randn(n, 4)}) for n in (10, 3, 50)]
    corpus = Corpus(feats, torch.tensor([1, 0, 0]), ["a", "b", "c"], {})
    x, owner, weight = token_table(corpus, ["model.layers.2"], TokenRows(skip=2, max_rows=16))
    # 10 → 8 rows after skipping 2; 3 → 1; 50 → 48 → 16 evenly spaced
    assert owner.tolist().count(0) == 8 and owner.tolist().count(1) == 1 and owner.tolist().count(2) == 16
    assert x.shape == (25, 4)
    for i in range(3):  # every record weighs 1 in total
        assert float(weight[owner == i].sum()) == pytest.approx(1.0)


def test_weighted_fit_equals_duplicated_rows() -> None:
    """Row weights act like repeated rows, and classes are balanced by weight totals (not row counts)."""
    from detectors.linear import fit_logistic

    g = torch.Generator().manual_seed(0)
    xp, xn = torch.randn(40, 3, generator=g) + 1.0, torch.randn(90, 3, generator=g)
    kw: dict[str, Any] = {"C": 0.5, "standardise": False}  # duplicating rows would move mean / std
    a = fit_logistic(xp, xn, w_pos=torch.full((40,), 2.0), w_neg=torch.ones(90), **kw)
    b = fit_logistic(torch.cat([xp, xp]), xn, w_pos=torch.ones(80), w_neg=torch.ones(90), **kw)
    c = fit_logistic(torch.cat([xp, xp]), xn, **kw)  # no weights: sklearn's row-count balancing
    for other in (b, c):
        assert torch.allclose(a.weight, other.weight, atol=1e-3) and abs(float(a.bias - other.bias)) < 1e-3


def test_calib_recall_uses_each_folds_own_threshold() -> None:
    folds = torch.tensor([0, 0, 1, 1])
    oof = torch.tensor([0.9, 0.1, 0.6, 0.2], dtype=torch.float64)
    positives = torch.tensor([True, False, True, False])
    calib = [torch.tensor([0.5, 0.4]), torch.tensor([0.7, 0.1])]  # fold 1's model scores calib higher
    assert calib_recall(oof, calib, folds, positives, 0.4) == 0.5  # 0.9 ≥ 0.5 fires, 0.6 < 0.7 does not


def test_hard_negatives_raise_each_folds_threshold() -> None:
    """hard_recall: a fold's held-out hard negatives join its calibration negatives, so a variant that
    scores topic-matched benign texts as high as its positives loses the recall it bought that way."""
    folds = torch.tensor([0, 0, 0, 1, 1, 1])
    oof = torch.tensor([0.8, 0.95, 0.1, 0.6, 0.2, 0.3], dtype=torch.float64)
    positives = torch.tensor([True, False, False, True, False, False])
    hard = torch.tensor([False, True, False, False, True, False])
    calib = [torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.5, 0.1, 0.2])]
    assert calib_recall(oof, calib, folds, positives, 0.2) == 1.0  # thresholds just above 0.5 / 0.5
    # fold 0 now has 0.95 among its negatives: no negative may fire, so its threshold passes 0.95 > 0.8;
    # fold 1's hard negative (0.2) is below its positive and changes nothing
    assert calib_recall(oof, calib, folds, positives, 0.2, hard) == 0.5


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SAE, list[Any], list[Any], list[Any]]:
    folder = tmp_path_factory.mktemp("tok")
    sae = _sae(folder)
    train = [_chat(i, lab, "train") for i in range(12) for lab in (0, 1)]
    test = [_chat(i, lab, "test") for i in range(12, 16) for lab in (0, 1)]
    calib = [{"id": f"c{i}", "label": 0, **_chat(100 + i, 0, "calib")} for i in range(10)]
    return folder, sae, train, calib, test


def test_token_level_build_with_calibration_split(
    toy: tuple[Path, SAE, list[Any], list[Any], list[Any]], tiny_lm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, sae, train, calib, test = toy
    cache = folder / "cache"
    kw: dict[str, Any] = {
        "test_records": test,
        "layers": ["model.layers.2"],
        "n_latents": 4,
        "pools": ("token",),
        "token_rows": TokenRows(skip=1, max_rows=8),
        "select_by": "calib_recall",
        "select_fpr": 0.2,
        "calib_only": True,
        "operating_fprs": (0.2,),
        "cache_dir": cache,
    }
    result = build_concept_detectors(
        tiny_lm.model, tiny_lm.tokenizer, sae, "toy", train, calib, folder / "detectors", **kw
    )
    probe = result.specs["toy_probe"]
    ev = probe.eval
    assert ev["train"]["variant"]["pool"] == "token" and ev["train"]["token_rows"] == {
        "skip": 1,
        "max_rows": 8,
    }
    assert set(ev["variants_auroc_oof"]) == {
        f"pool=token,agg={a},C={c}" for a in ("mean", "topk_mean:8") for c in (0.001, 0.01, 0.1)
    }
    assert ev["selection"]["by"] == "calib_recall@0.2" and len(ev["selection"]["variants"]) == 6
    assert ev["calibration"] == {"n_neg_oof": 0, "n_neg_extra": 10, "n_skipped_no_completion": 0}
    assert set(probe.operating_points) == {"0.2"} and probe.operating_points["0.2"] <= probe.threshold
    assert ev["operating_points"]["0.2"]["n_pos"] == 4 and ev["test"]["n_neg"] == 4
    assert ev["auroc_test"] > 0.8  # the toy concept is separable token by token too
    # the written spec loads and scores like any probe (no new required field)
    dets = load_detectors(["toy_probe"], folder / "detectors", sae, model=tiny_lm.model)
    assert dets["toy_probe"].spec.aggregation.kind in ("mean", "topk_mean")
    shipped = load_spec(folder / "detectors" / "toy.yaml")
    assert "0.2" in shipped.operating_points and shipped.kind == result.selected
    # every record is cached; a rerun reads the cache and runs no forward pass
    assert len(list(cache.glob("*/*.safetensors"))) == len(train) + len(calib) + len(test)

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("forward pass despite the cache")

    # extract_corpus looks the name up in detectors.corpus
    monkeypatch.setattr(
        "detectors.corpus.iter_token_features", lambda *a, **k: iter(()) if not a[2] else boom()
    )
    again = build_concept_detectors(
        tiny_lm.model, tiny_lm.tokenizer, sae, "toy", train, calib, folder / "again", **kw
    )
    assert again.specs["toy_probe"].threshold == pytest.approx(probe.threshold, abs=1e-9)


def _build_pooled(
    toy: tuple[Path, SAE, list[Any], list[Any], list[Any]], tiny_lm: Any, sub: str, pool: str
) -> Any:
    """The toy concept built with one training pool into `<toy folder>/<sub>`."""
    folder, sae, train, calib, test = toy
    return build_concept_detectors(
        tiny_lm.model,
        tiny_lm.tokenizer,
        sae,
        "toy",
        train,
        calib,
        folder / sub,
        test_records=test,
        layers=["model.layers.2"],
        n_latents=4,
        pools=(pool,),
    )


def test_last_pool_fits_the_end_of_each_completion(
    toy: tuple[Path, SAE, list[Any], list[Any], list[Any]], tiny_lm: Any
) -> None:
    """pool "last:K" trains on the mean of each record's last K completion tokens and is served as the
    mean of the last K token scores (or the max): the written spec reproduces the pooled fit's ranking."""
    feats = [TokenFeatures(resid={"model.layers.2": torch.arange(12.0).reshape(6, 2)})]
    corpus = Corpus(feats, torch.tensor([1]), ["a"], {})
    assert pooled_table(corpus, "resid", "last:2", "model.layers.2").tolist() == [[9.0, 10.0]]
    assert valid_pool("last:3") and not valid_pool("last:0") and not valid_pool("last")
    result = _build_pooled(toy, tiny_lm, "last", "last:2")
    ev = result.specs["toy_probe"].eval
    assert set(ev["variants_auroc_oof"]) == {
        f"pool=last:2,agg={a},C={c}" for a in ("last_mean:2", "max") for c in (0.001, 0.01, 0.1)
    }
    agg = result.specs["toy_probe"].aggregation
    assert (agg.kind, agg.k) in (("last_mean", 2), ("max", None))
    assert ev["auroc_test"] > 0.8


def test_mix_pool_fits_mean_and_end_together_and_serves_it_exactly(
    toy: tuple[Path, SAE, list[Any], list[Any], list[Any]], tiny_lm: Any
) -> None:
    """pool "mix:K:A" trains on A·mean + (1 − A)·mean of the last K tokens and is served as the mix
    aggregation with the same K and A, whose value on a record is the fitted probe's on its mixed pool."""
    feats = [TokenFeatures(resid={"model.layers.2": torch.arange(12.0).reshape(6, 2)})]
    corpus = Corpus(feats, torch.tensor([1]), ["a"], {})
    # mean (5, 6), last two (9, 10): 0.25·mean + 0.75·last
    assert pooled_table(corpus, "resid", "mix:2:0.25", "model.layers.2").tolist() == [[8.0, 9.0]]
    assert mix_pool("mix:2:0.25") == (2, 0.25)
    for bad in ("mix:0:0.5", "mix:2:1.5", "mix:2:0", "mix:2", "mix:x:0.5", "mix:2:abc"):
        assert not valid_pool(bad), bad
    assert parse_agg("mix:2:0.25") == Aggregation(kind="mix", k=2, alpha=0.25)
    result = _build_pooled(toy, tiny_lm, "mix", "mix:2:0.5")
    spec = result.specs["toy_probe"]
    assert set(spec.eval["variants_auroc_oof"]) == {
        f"pool=mix:2:0.5,agg=mix:2:0.5,C={c}" for c in (0.001, 0.01, 0.1)
    }
    assert (spec.aggregation.kind, spec.aggregation.k, spec.aggregation.alpha) == ("mix", 2, 0.5)
    assert spec.eval["auroc_test"] > 0.8
    # The written detector reproduces the fit on the mixed pool of a record it scores.
    _, sae, _, _, test = toy
    det = load_detector("toy_probe", toy[0] / "mix", sae, model=tiny_lm.model)
    f = next(iter_token_features(tiny_lm.model, tiny_lm.tokenizer, test[:1], ["model.layers.2"]))
    x = f.resid_at("model.layers.2").float()
    pooled = 0.5 * x.mean(0) + 0.5 * x[-2:].mean(0)
    assert isinstance(det, ProbeDetector)
    want = float(torch.sigmoid(det.fit.logits(pooled[None]))[0])
    assert aggregate(det.score_tokens(f), spec.aggregation) == pytest.approx(want, abs=1e-5)


def test_active_latents_keeps_frequent_ones_most_frequent_first(monkeypatch: pytest.MonkeyPatch) -> None:
    lat = torch.zeros(200, 5)
    lat[:, 1] = 1.0  # every row
    lat[:100, 3] = 0.5  # half the rows
    lat[:1, 4] = 2.0  # 0.5 % of rows: below LATENT_MIN_SHARE (1 %)
    assert active_latents(lat) == [1, 3]
    monkeypatch.setattr("detectors.fitting.LATENT_INPUTS_MAX", 1)
    assert active_latents(lat) == [1]
    assert active_latents(torch.zeros(10, 5)) == [0]  # never empty: a probe needs an input


def test_latent_probe_reads_sae_latents_and_reloads(
    toy: tuple[Path, SAE, list[Any], list[Any], list[Any]], tiny_lm: Any
) -> None:
    """pool "latents": a probe on mean-pooled SAE latents, written as `on_latents` with the latent ids in
    both the spec and the weights file; the reloaded detector scores records as the built one did."""
    from detectors.extract import iter_token_features
    from detectors.probe import load_probe

    folder, sae, _, _, test = toy
    result = _build_pooled(toy, tiny_lm, "lat", "latents")
    spec = result.specs["toy_probe"]
    assert set(spec.eval["variants_auroc_oof"]) == {
        f"pool=latents,agg={a},C={c}" for a in ("mean", "max") for c in (0.001, 0.01, 0.1)
    }
    assert spec.on_latents and spec.hook_points == [] and spec.latent_ids
    _, meta = load_probe(folder / "lat" / "toy_probe.safetensors")
    assert meta == {"latent_ids": spec.latent_ids}
    det = load_detectors(["toy_probe"], folder / "lat", sae, model=tiny_lm.model)["toy_probe"]
    assert det.latent_ids() == spec.latent_ids and det.hook_points() == []
    feats = iter_token_features(
        tiny_lm.model,
        tiny_lm.tokenizer,
        test,
        [],
        scope="completion",
        batch_size=4,
        sae=sae,
        latent_ids=det.latent_ids(),
    )
    scores = torch.tensor([float(det.score_tokens(f).mean()) for f in feats])
    labels = torch.tensor([r["label"] for r in test])
    assert float(scores[labels == 1].min()) > float(scores[labels == 0].max())  # the toy concept separates


def test_stream_calibration_thresholds_the_peaks(
    toy: tuple[Path, SAE, list[Any], list[Any], list[Any]], tiny_lm: Any
) -> None:
    """stream_from: the thresholds are set on each calibration negative's peak running value from that
    token on (what a mid-stream rule sees), so a mean-aggregated probe's threshold can only rise, and
    the thresholded test figures count a record that peaked above it mid-stream."""
    from detectors.aggregate import stream_peak
    from detectors.calibrate import threshold_for_fpr
    from detectors.errors import DetectorError
    from detectors.extract import iter_token_features

    folder, sae, train, calib, test = toy
    kw: dict[str, Any] = {
        "test_records": test,
        "layers": ["model.layers.2"],
        "n_latents": 4,
        "pools": ("mean",),
        "calib_only": True,
        "target_fpr": 0.2,
    }
    lm = (tiny_lm.model, tiny_lm.tokenizer, sae, "toy", train, calib)
    final = build_concept_detectors(*lm, folder / "final", **kw).specs["toy_probe"]
    sel = {"select_by": "hard_recall", "select_fpr": 0.2}
    peak = build_concept_detectors(*lm, folder / "peak", stream_from=3, **sel, **kw).specs["toy_probe"]
    assert peak.eval["calibration"]["stream_from"] == 3 and "stream_from" not in final.eval["calibration"]
    # hard_recall: each fold's held-out seed negatives (all 12 toy negatives are seed) join its calib set
    assert peak.eval["selection"]["by"] == "hard_recall@0.2" and peak.eval["selection"]["n_hard_neg"] == 12
    assert peak.aggregation == final.aggregation and peak.threshold > final.threshold  # toy: early peaks
    det = load_detectors(["toy_probe"], folder / "peak", sae, model=tiny_lm.model)["toy_probe"]
    feats = iter_token_features(
        tiny_lm.model, tiny_lm.tokenizer, calib, det.hook_points(), scope="completion", batch_size=4
    )
    peaks = [stream_peak(det.score_tokens(f), det.spec.aggregation, 3) for f in feats]
    assert peak.threshold == pytest.approx(threshold_for_fpr(torch.tensor(peaks), 0.2), abs=1e-6)
    with pytest.raises(DetectorError, match="stream_from"):
        build_concept_detectors(*lm, folder / "x", stream_from=0, **kw)


def test_build_rejects_unknown_pools(
    toy: tuple[Path, SAE, list[Any], list[Any], list[Any]], tiny_lm: Any
) -> None:
    from detectors.errors import DetectorError

    folder, sae, train, calib, _ = toy
    with pytest.raises(DetectorError, match="pools"):
        build_concept_detectors(
            tiny_lm.model, tiny_lm.tokenizer, sae, "toy", train, calib, folder / "x", pools=("span",)
        )
    with pytest.raises(DetectorError, match="pools"):
        build_concept_detectors(
            tiny_lm.model, tiny_lm.tokenizer, sae, "toy", train, calib, folder / "x", pools=("last:0",)
        )


def test_cli_train_token_level_and_eval_neg_suite(tmp_path: Path, tiny_model_dir: Path) -> None:
    runner = CliRunner()
    folder = tmp_path / "sae"
    _sae(folder)
    recs = [_chat(i, lab, "test" if i % 4 == 0 else "train") for i in range(16) for lab in (0, 1)]
    (folder / "concepts").mkdir()
    (folder / "concepts" / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    negs = [{k: v for k, v in _chat(200 + i, 0, "").items() if k != "split"} for i in range(8)]
    calib, held = tmp_path / "calib.jsonl", tmp_path / "heldneg.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in negs[:5]))
    held.write_text("".join(json.dumps(r) + "\n" for r in negs[5:]))
    common = ["--sae", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress"]
    args = ["detectors", "train", "--concept", "toy", "--layers", "model.layers.2", *common]
    bad = runner.invoke(app, [*args, "--pools", "mean,span"])
    assert bad.exit_code == 2 and "--pools" in bad.output
    bad = runner.invoke(app, [*args, "--operating-points", "0.9"])
    assert bad.exit_code == 2 and "--operating-points" in bad.output
    bad = runner.invoke(app, [*args, "--calib-only"])
    assert bad.exit_code == 2 and "--calib" in bad.output
    res = runner.invoke(
        app,
        [
            *args,
            "--pools",
            "mean,token",
            "--token-rows",
            "4",
            "--calib",
            str(calib),
            "--calib-only",
            "--select-by",
            "calib_recall",
            "--operating-points",
            "0.2",
            "--test",
            str(held),
            "--cache",
            str(tmp_path / "cache"),
        ],
    )
    assert res.exit_code == 0, res.output
    spec = load_spec(folder / "detectors" / "toy_probe.yaml")
    assert spec.eval["test"]["n_neg"] == 4 + 3 and "0.2" in spec.operating_points
    assert spec.eval["calibration"]["n_neg_oof"] == 0
    by_pool = spec.eval["by_pool"]  # the best of each training unit, on the same held-out records
    assert set(by_pool) == {"mean", "token"} and all(p["test"]["n_neg"] == 7 for p in by_pool.values())
    assert by_pool[spec.eval["train"]["variant"]["pool"]]["threshold"] == spec.threshold
    assert set(spec.eval["test_fpr_by_source"]) == {"seed", "other"}  # seed test vs the --test file
    report = tmp_path / "eval.md"
    res = runner.invoke(
        app,
        ["detectors", "eval", "--concepts", "toy", "--out", str(report), "--neg-suite", str(held), *common],
    )
    assert res.exit_code == 0, res.output
    assert "| seed-test+heldneg | 4 / 7 | tfidf |" in report.read_text()
