"""Sanity report of an SAE folder: its config plus checks that catch broken or mismatched weights.

`problems` lists what makes the SAE unusable (missing files, bad config, wrong shapes, non-finite weights);
`warnings` lists what is unusual but loadable (dtype differs from cfg.json, decoder rows not unit norm,
all-zero decoder rows, non-positive JumpReLU thresholds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sae_assets.sae import CFG_FILENAME, WEIGHTS_FILENAME, SAEConfig, SAEFormatError, dtype_name
from sae_assets.train import LOG_FILENAME, TRAIN_CFG_FILENAME

# Unit norm within 1%: fp16/bf16 storage alone moves norms by ~1e-3.
UNIT_NORM_TOL = 1e-2


def _stats(t: torch.Tensor) -> dict[str, float]:
    t = t.double()
    return {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}


def _expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_enc": (cfg.d_sae,),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    return shapes


def _read_config(folder: Path, report: dict[str, Any]) -> SAEConfig | None:
    cfg_path = folder / CFG_FILENAME
    if not cfg_path.is_file():
        report["problems"].append(f"{cfg_path}: missing (is this an SAELens-format SAE folder?)")
        return None
    try:
        raw = json.loads(cfg_path.read_text())
        cfg = SAEConfig.from_dict(raw)
    except json.JSONDecodeError as e:
        report["problems"].append(f"{cfg_path}: invalid JSON: {e}")
        return None
    except (SAEFormatError, TypeError, ValueError) as e:
        report["problems"].append(f"{cfg_path}: {e}")
        return None
    report["config"] = cfg.to_dict()
    return cfg


def _read_tensors(folder: Path, report: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    w_path = folder / WEIGHTS_FILENAME
    if not w_path.is_file():
        report["problems"].append(f"{w_path}: missing")
        return None
    try:
        state = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        report["problems"].append(f"{w_path}: cannot be read: {e}")
        return None
    if "log_threshold" in state and "threshold" not in state:
        state["threshold"] = state.pop("log_threshold").exp()  # SAELens training checkpoints
    report["tensors"] = {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype)} for k, v in state.items()}
    return state


def _check_tensors(cfg: SAEConfig, state: dict[str, torch.Tensor], report: dict[str, Any]) -> None:
    problems, warnings, checks = report["problems"], report["warnings"], report["checks"]
    want = _expected_shapes(cfg)
    for name in sorted(set(want) - set(state)):
        problems.append(f"missing tensor {name} (architecture {cfg.architecture})")
    for name in sorted(set(state) - set(want)):
        problems.append(f"unexpected tensor {name} for architecture {cfg.architecture}")
    for name, shape in want.items():
        if name in state and tuple(state[name].shape) != shape:
            problems.append(f"{name} has shape {tuple(state[name].shape)}, cfg.json implies {shape}")
    checks["shapes_match_cfg"] = set(want) == set(state) and all(
        tuple(state[n].shape) == shape for n, shape in want.items()
    )
    checks["dtype_matches_cfg"] = all(dtype_name(t.dtype) == cfg.dtype for t in state.values())
    for name, t in state.items():
        if dtype_name(t.dtype) != cfg.dtype:
            warnings.append(f"{name} is stored as {dtype_name(t.dtype)}, cfg.json says {cfg.dtype}")
        n_bad = int((~torch.isfinite(t)).sum())
        if n_bad:
            problems.append(f"{name} has {n_bad} non-finite value(s)")
    checks["finite"] = all(bool(torch.isfinite(t).all()) for t in state.values())
    W_dec = state.get("W_dec")
    if W_dec is not None and W_dec.ndim == 2 and W_dec.shape[0] == cfg.d_sae:
        norms = W_dec.double().norm(dim=-1)  # (d_sae,)
        unit = bool(((norms - 1).abs() <= UNIT_NORM_TOL).all())
        checks["decoder_row_norms"] = {**_stats(norms), "unit": unit}
        n_zero = int((norms == 0).sum())
        if n_zero:
            warnings.append(f"{n_zero} decoder row(s) are all zero (latents that can never write anything)")
        if not unit:
            warnings.append(
                "decoder rows are not unit norm (fine for some ReLU/JumpReLU SAEs; TopK trains them unit)"
            )
    thr = state.get("threshold")
    if cfg.architecture == "jumprelu" and thr is not None and thr.shape == (cfg.d_sae,):
        checks["threshold"] = {**_stats(thr), "non_positive": int((thr <= 0).sum())}
        if int((thr <= 0).sum()):
            warnings.append(
                f"{int((thr <= 0).sum())} JumpReLU threshold(s) are <= 0 (those latents act as ReLU)"
            )
    if cfg.architecture == "topk":
        checks["k"] = cfg.k


def _training_info(folder: Path) -> dict[str, Any] | None:
    """train_cfg.json and the last train_log.jsonl record, when the folder was written by our trainer."""
    info: dict[str, Any] = {}
    cfg_path, log_path = folder / TRAIN_CFG_FILENAME, folder / LOG_FILENAME
    if cfg_path.is_file():
        info["train_cfg"] = json.loads(cfg_path.read_text())
    if log_path.is_file():
        lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
        if lines:
            info["last_step"] = json.loads(lines[-1])
    return info or None


def sae_report(path: str | Path) -> dict[str, Any]:
    """{path, ok, config, tensors, checks, problems, warnings, training}; `ok` is True when no problems."""
    folder = Path(path)
    report: dict[str, Any] = {
        "path": str(folder),
        "ok": False,
        "config": None,
        "tensors": {},
        "checks": {},
        "problems": [],
        "warnings": [],
        "training": None,
    }
    if not folder.is_dir():
        report["problems"].append(f"{folder}: not a directory")
        return report
    cfg = _read_config(folder, report)
    state = _read_tensors(folder, report)
    if cfg is not None and state is not None:
        _check_tensors(cfg, state, report)
    report["training"] = _training_info(folder)
    report["ok"] = not report["problems"]
    return report
