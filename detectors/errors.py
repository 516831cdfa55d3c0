"""The one error type of the detectors package: every load/build failure raises it, naming what is valid."""

from __future__ import annotations


class DetectorError(ValueError):
    """A detector that cannot be loaded or built. Callers must fail closed (refuse to serve), never skip."""
