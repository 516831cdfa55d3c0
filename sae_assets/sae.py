"""Sparse autoencoder (SAE) in the SAELens on-disk format.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` with tensors ``W_enc`` (d_in, d_sae),
``W_dec`` (d_sae, d_in), ``b_enc`` (d_sae), ``b_dec`` (d_in) and, for JumpReLU, ``threshold`` (d_sae).
Field names follow SAELens v6 (``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input``,
``normalize_activations``, ``metadata.hook_name``, ``metadata.model_name`` …); SAELens calls the plain
ReLU architecture ``standard``, and so do we on disk (``relu`` is accepted as an alias).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
Architecture = Literal["standard", "jumprelu", "topk"]
ARCHITECTURES: tuple[str, ...] = ("standard", "jumprelu", "topk")
_ALIASES = {"relu": "standard", "standard": "standard", "jumprelu": "jumprelu", "topk": "topk"}
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# Written into metadata so SAELens readers know which format version the file follows.
SAE_LENS_FORMAT_VERSION = "6.12.0"
# SAELens' metadata keys (v6); anything else found in `metadata` is kept verbatim in `extra`.
_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
)


class SAEFormatError(ValueError):
    """A folder that does not hold a valid SAE; the message names the file and field at fault."""


def canonical_architecture(name: str) -> str:
    try:
        return _ALIASES[name]
    except KeyError:
        raise SAEFormatError(
            f"cfg.json: architecture {name!r} is not supported; valid: relu (standard), jumprelu, topk"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise SAEFormatError(f"dtype {dtype} is not supported; valid: {', '.join(DTYPES)}")


def parse_dtype(name: str) -> torch.dtype:
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise SAEFormatError(f"cfg.json: dtype {name!r} is not supported; valid: {', '.join(DTYPES)}")
    return DTYPES[key]


@dataclass(frozen=True)
class SAEMetadata:
    """How the SAE attaches to a model. `hook_name` is the SAELens name (e.g. blocks.15.hook_resid_post)."""

    model_name: str | None = None
    hook_name: str | None = None
    model_class_name: str | None = None
    hook_head_index: int | None = None
    model_from_pretrained_kwargs: dict[str, Any] | None = None
    prepend_bos: bool | None = None
    exclude_special_tokens: bool | list[int] | None = None
    neuronpedia_id: str | None = None
    context_size: int | None = None
    seqpos_slice: list[int | None] | None = None
    dataset_path: str | None = None
    sae_lens_version: str = SAE_LENS_FORMAT_VERSION
    sae_lens_training_version: str = SAE_LENS_FORMAT_VERSION
    # featurewatch's own keys (Hugging Face module path, training notes…) live here, flattened on disk.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _METADATA_KEYS}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SAEMetadata:
        known = {k: raw[k] for k in _METADATA_KEYS if k in raw}
        if isinstance(known.get("seqpos_slice"), tuple):
            known["seqpos_slice"] = list(known["seqpos_slice"])
        extra = {k: v for k, v in raw.items() if k not in _METADATA_KEYS}
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class SAEConfig:
    """The one config object behind `cfg.json`, validation and `featurewatch sae info`."""

    architecture: str
    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    k: int | None = None  # topk only: latents kept per token
    metadata: SAEMetadata = field(default_factory=SAEMetadata)

    def __post_init__(self) -> None:
        object.__setattr__(self, "architecture", canonical_architecture(self.architecture))
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAEFormatError(f"cfg.json: d_in and d_sae must be positive (got {self.d_in}, {self.d_sae})")
        parse_dtype(self.dtype)
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEFormatError(
                f"cfg.json: normalize_activations {self.normalize_activations!r} is not supported; "
                f"valid: {', '.join(NORMALIZATIONS)}"
            )
        if self.reshape_activations != "none":
            raise SAEFormatError("cfg.json: reshape_activations other than 'none' (hook_z) is not supported")
        if self.architecture == "topk" and (self.k is None or not 0 < self.k <= self.d_sae):
            raise SAEFormatError(f"cfg.json: topk needs 0 < k <= d_sae (got k={self.k})")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": self.device,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": self.reshape_activations,
            "metadata": self.metadata.to_dict(),
        }
        if self.architecture == "topk":
            out["k"] = self.k
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SAEConfig:
        missing = [k for k in ("d_in", "d_sae") if k not in raw]
        if missing:
            raise SAEFormatError(f"cfg.json: missing required field(s) {', '.join(missing)}")
        meta_raw = raw.get("metadata", raw.get("meta"))
        if meta_raw is None:
            # SAELens < 6 kept metadata fields at the top level.
            meta_raw = {k: raw[k] for k in (*_METADATA_KEYS, "hook_layer") if k in raw}
        k = raw.get("k")
        if k is None and isinstance(raw.get("activation_fn_kwargs"), dict):
            k = raw["activation_fn_kwargs"].get("k")  # SAELens < 6 stored topk's k here
        return cls(
            architecture=str(raw.get("architecture", "standard")),
            d_in=int(raw["d_in"]),
            d_sae=int(raw["d_sae"]),
            dtype=str(raw.get("dtype", "float32")).removeprefix("torch."),
            device=str(raw.get("device", "cpu")),
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            normalize_activations=str(raw.get("normalize_activations") or "none"),
            reshape_activations=str(raw.get("reshape_activations") or "none"),
            k=int(k) if k is not None else None,
            metadata=SAEMetadata.from_dict(dict(meta_raw)),
        )


class SAE(nn.Module):
    """Inference SAE: relu (`standard`), `jumprelu` or `topk`.

    encode: f = act((x_norm - b_dec·apply) @ W_enc + b_enc); decode: x̂ = f @ W_dec + b_dec.
    """

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    threshold: nn.Parameter

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dt = parse_dtype(cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dt))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))

    # ---- shapes and normalisation -------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def _norm_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns normalised x and the (scale, shift) needed to undo it in decode."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            scale = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            return x * scale, scale, None
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            return (x - mu) / (std + 1e-5), std + 1e-5, mu
        # "expected_average_only_in" is folded into the weights by SAELens loaders; treat as none here.
        return x, None, None

    def _sae_in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        x, _, _ = self._norm_in(x)
        return x - self.b_dec * float(self.cfg.apply_b_dec_to_input)

    # ---- encode ----------------------------------------------------------------------------
    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        return self._sae_in(x) @ self.W_enc + self.b_enc  # (..., d_sae)

    def _activate(self, pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":
            assert threshold is not None
            return pre * (pre > threshold).to(pre.dtype)
        assert self.cfg.k is not None
        top = pre.topk(self.cfg.k, dim=-1)
        out = torch.zeros_like(pre)
        return out.scatter_(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """All latents: (..., d_in) -> (..., d_sae)."""
        thr = self.threshold if self.cfg.architecture == "jumprelu" else None
        return self._activate(self.hidden_pre(x), thr)

    def encode_watched(self, x: torch.Tensor, latent_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Only `latent_ids`: (..., d_in) -> (..., n_watched), O(d_in × n_watched) per token.

        Exact for relu/jumprelu because each latent depends only on its own column. TopK latents compete
        with all others, so the exact answer needs the full encode; we do that and gather.
        """
        ids = torch.as_tensor(latent_ids, dtype=torch.long, device=self.W_enc.device)
        if self.cfg.architecture == "topk":
            return self.encode(x).index_select(-1, ids)
        pre = self._sae_in(x) @ self.W_enc.index_select(1, ids) + self.b_enc.index_select(0, ids)
        thr = self.threshold.index_select(0, ids) if self.cfg.architecture == "jumprelu" else None
        return self._activate(pre, thr)

    # ---- decode ----------------------------------------------------------------------------
    def decode(self, f: torch.Tensor, x_for_norm: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d_sae) -> (..., d_in). Pass the original input when normalisation must be undone."""
        out = f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if x_for_norm is not None and self.cfg.normalize_activations in (
            "constant_norm_rescale",
            "layer_norm",
        ):
            _, scale, shift = self._norm_in(x_for_norm.to(self.W_enc.dtype))
            if self.cfg.normalize_activations == "constant_norm_rescale":
                assert scale is not None
                out = out / scale
            else:
                assert scale is not None and shift is not None
                out = out * scale + shift
        return out

    def decode_gain(self, x: torch.Tensor) -> torch.Tensor:
        """(...,) the factor g by which `decode(f, x_for_norm=x)` scales f @ W_dec: 1 without per-token
        normalisation (what is linear in the latents, for attributing a readout to them)."""
        mode = self.cfg.normalize_activations
        if mode not in ("constant_norm_rescale", "layer_norm"):
            return torch.ones(x.shape[:-1], dtype=torch.float32, device=x.device)
        _, scale, _ = self._norm_in(x.to(self.W_enc.dtype))
        assert scale is not None
        g = 1.0 / scale if mode == "constant_norm_rescale" else scale
        return g.squeeze(-1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x_for_norm=x)

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path, dtype: str | None = None) -> Path:
        """Write cfg.json and sae_weights.safetensors (SAELens layout). `dtype` re-casts weights on disk."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = replace(self.cfg, dtype=dtype or self.cfg.dtype, device="cpu")
        dt = parse_dtype(cfg.dtype)
        tensors = {k: v.detach().to("cpu", dt).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_FILENAME))
        (folder / CFG_FILENAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> SAE:
        folder = Path(path)
        cfg_path, w_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
        if not cfg_path.is_file():
            raise SAEFormatError(f"{folder}: no {CFG_FILENAME} (is this an SAELens-format SAE folder?)")
        if not w_path.is_file():
            raise SAEFormatError(f"{folder}: no {WEIGHTS_FILENAME}")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise SAEFormatError(f"{cfg_path}: invalid JSON: {e}") from e
        cfg = SAEConfig.from_dict(raw)
        if dtype is None and torch.device(device).type == "cpu" and cfg.dtype in ("float16", "bfloat16"):
            dtype = "float32"  # shipped half weights: CPU half matmuls are slow, so compute in fp32
        if dtype is not None:
            cfg = replace(cfg, dtype=dtype)
        sae = cls(cfg)
        state = load_file(str(w_path))
        if "log_threshold" in state and "threshold" not in state:
            state["threshold"] = state.pop("log_threshold").exp()  # SAELens training checkpoints
        sae._check_state(state, w_path)
        sae.load_state_dict({k: v.to(parse_dtype(cfg.dtype)) for k, v in state.items()})
        return sae.to(device)

    def _check_state(self, state: dict[str, torch.Tensor], where: Path) -> None:
        want = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        extra = sorted(set(state) - set(want))
        missing = sorted(set(want) - set(state))
        if missing:
            raise SAEFormatError(f"{where}: missing tensor(s) {', '.join(missing)}")
        if extra:
            raise SAEFormatError(
                f"{where}: unexpected tensor(s) {', '.join(extra)} for architecture {self.cfg.architecture}"
            )
        for k, shape in want.items():
            if tuple(state[k].shape) != shape:
                raise SAEFormatError(
                    f"{where}: {k} has shape {tuple(state[k].shape)}, cfg.json implies {shape}"
                )
