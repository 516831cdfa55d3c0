"""The top-level packages import as the real packages under pytest (not test folders of the same name)."""

import detectors
import monitor
import sae_assets


def test_packages_are_the_real_ones() -> None:
    assert detectors.__file__ is not None and detectors.__file__.endswith("detectors/__init__.py")
    assert hasattr(detectors, "load_detectors")
    assert monitor.__file__ is not None and sae_assets.__file__ is not None
