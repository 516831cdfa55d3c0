"""Concept detectors over a model's SAE latents and residual stream (milestone [3/7]).

Everything public is re-exported here. The built-in kinds (`sae_features`, `probe`) register themselves
with the registry on import; `detectors.registry` imports them on first use, so submodule imports work too.
"""

from detectors.aggregate import (
    Aggregation,
    RunningAggregate,
    agg_max,
    agg_mean,
    aggregate,
    count_over,
    ema,
    last_mean,
    stream_peak,
    sustained,
    topk_mean,
)
from detectors.base import Detector, TokenFeatures, fires, score_message, top_latents_by_activation
from detectors.calibrate import (
    auroc,
    auroc_columns,
    calibrate_detector,
    message_scores,
    metrics,
    threshold_for_fpr,
)
from detectors.discover import LatentRank, discover, make_sae_features_spec, rank_latents
from detectors.errors import DetectorError
from detectors.extract import (
    iter_token_features,
    pooled_latents,
    pooled_resid,
    sae_hook_point,
    scope_span,
    scoped_positions,
    token_rows,
)
from detectors.linear import LinearFit, fit_logistic
from detectors.probe import ProbeDetector, load_probe, save_probe, train_probe  # registers "probe"
from detectors.registry import (
    available_detectors,
    build_detector,
    load_detector,
    load_detectors,
    register_kind,
    registered_kinds,
)
from detectors.sae_features import SaeFeaturesDetector, fit_link  # registers "sae_features"
from detectors.spec import (
    SCOPES,
    BaseSpec,
    DetectorSpec,
    LatentSpec,
    ProbeSpec,
    SaeFeaturesSpec,
    Scope,
    dump_spec,
    load_spec,
    parse_spec,
)

__all__ = [
    "SCOPES",
    "Aggregation",
    "BaseSpec",
    "Detector",
    "DetectorError",
    "DetectorSpec",
    "LatentRank",
    "LatentSpec",
    "LinearFit",
    "ProbeDetector",
    "ProbeSpec",
    "RunningAggregate",
    "SaeFeaturesDetector",
    "SaeFeaturesSpec",
    "Scope",
    "TokenFeatures",
    "agg_max",
    "agg_mean",
    "aggregate",
    "auroc",
    "auroc_columns",
    "available_detectors",
    "build_detector",
    "calibrate_detector",
    "count_over",
    "discover",
    "dump_spec",
    "ema",
    "fires",
    "fit_link",
    "fit_logistic",
    "iter_token_features",
    "last_mean",
    "load_detector",
    "load_detectors",
    "load_probe",
    "load_spec",
    "make_sae_features_spec",
    "message_scores",
    "metrics",
    "parse_spec",
    "pooled_latents",
    "pooled_resid",
    "rank_latents",
    "register_kind",
    "registered_kinds",
    "sae_hook_point",
    "save_probe",
    "scope_span",
    "scoped_positions",
    "score_message",
    "stream_peak",
    "sustained",
    "threshold_for_fpr",
    "token_rows",
    "top_latents_by_activation",
    "topk_mean",
    "train_probe",
]
