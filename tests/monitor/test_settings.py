"""Settings precedence (options > env > YAML > defaults), validation messages and masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.settings import SettingsError, load_settings


def test_precedence_options_env_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "fw.yaml"
    cfg.write_text("port: 7000\nmax_batch_size: 4\nmodel: from-yaml\ndetectors: [scam]\n")
    monkeypatch.setenv("FEATUREWATCH_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("FEATUREWATCH_MODEL", "from-env")
    s = load_settings(cfg, model="from-cli")
    assert (s.port, s.max_batch_size, s.model, s.detectors) == (7000, 16, "from-cli", ["scam"])
    monkeypatch.setenv("FEATUREWATCH_CONFIG", str(cfg))
    assert load_settings().port == 7000  # the file named by the environment


def test_errors_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "fw.yaml"
    cfg.write_text("prot: 7000\n")
    with pytest.raises(SettingsError, match="prot: unknown setting"):
        load_settings(cfg)
    monkeypatch.setenv("FEATUREWATCH_MAX_QUEUE", "lots")
    with pytest.raises(SettingsError, match="max_queue: Input should be a valid integer"):
        load_settings()
    monkeypatch.delenv("FEATUREWATCH_MAX_QUEUE")
    with pytest.raises(SettingsError, match="port: Input should be less than or equal to 65535"):
        load_settings(port=70000)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(SettingsError, match="at least 16 characters"):
        load_settings(api_keys={"short": "acme"})


def test_masked_hides_secrets() -> None:
    key = "k" * 32
    s = load_settings(api_keys={key: "acme"}, redis_url="redis://user:hunter2@redis:6379/0")
    shown = str(s.masked())
    assert key not in shown and "hunter2" not in shown
    assert s.masked()["redis_url"] == "redis://user:***@redis:6379/0" and "1 key(s)" in shown
