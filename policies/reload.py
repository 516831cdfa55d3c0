"""Hot reload: hold the active policy and swap it only for a valid new one.

A bad edit never takes effect: the new text is checked in full, its issues are returned (and logged), and
the old policy stays active. At start-up there is no old policy to fall back on, so an invalid file raises
PolicyError (fail closed: a sidecar without a policy must not serve).

Sources of new text: `reload()` (the file), `watch()` (a background poller calling `reload` when the
file's content changes) and `apply_text(text, source)`, the seam for policies pushed from elsewhere
(Redis pub/sub in a later milestone).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from policies.loader import PolicyError, PolicyIssue, check_policy, parse_policy
from policies.schema import Policy

log = logging.getLogger(__name__)
ReloadCallback = Callable[[list[PolicyIssue]], None]
# Checks beyond the file itself (e.g. the server: every steer source can steer); issues reject the policy.
PolicyValidator = Callable[[Policy, str], list[PolicyIssue]]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PolicyHolder:
    """The active policy (`holder.policy`), safe to read from any thread while reloads happen.

    `generation` counts successful loads (1 after start-up). `on_reload(issues)` is called after every
    reload attempt, with [] when the new policy was applied.
    """

    def __init__(
        self,
        path: str | Path,
        known_detectors: set[str] | None = None,
        *,
        on_reload: ReloadCallback | None = None,
        validate: PolicyValidator | None = None,
    ) -> None:
        self.path = Path(path)
        self.known_detectors = known_detectors
        self.on_reload = on_reload
        self.validate = validate
        self._lock = threading.Lock()
        text = self._read()
        self._policy: Policy = parse_policy(text, str(self.path), known_detectors)
        extra = validate(self._policy, str(self.path)) if validate is not None else []
        if extra:
            raise PolicyError(extra)
        self._file_digest = _digest(text)  # the file content last tried, so a watcher retries only on change
        self.generation = 1
        self.last_issues: list[PolicyIssue] = []

    @property
    def policy(self) -> Policy:
        return self._policy

    def reload(self) -> list[PolicyIssue]:
        """Re-read the file; swap in the new policy if valid. Returns the issues ([] when applied)."""
        try:
            text = self._read()
        except PolicyError as e:
            return self._rejected(e.issues)
        self._file_digest = _digest(text)
        return self.apply_text(text, str(self.path))

    def apply_text(self, text: str, source: str) -> list[PolicyIssue]:
        """Check `text` in full and make it the active policy only if it has no issues."""
        policy, issues = check_policy(text, source, self.known_detectors)
        if not issues and policy is not None and self.validate is not None:
            issues = self.validate(policy, source)
        if issues or policy is None:
            return self._rejected(issues)
        with self._lock:  # one swap at a time, so generation matches the number of swaps
            self._policy = policy
            self.generation += 1
            self.last_issues = []
        log.info("policy %r version %s applied from %s", policy.name, policy.version, source)
        if self.on_reload is not None:
            self.on_reload([])
        return []

    def reload_if_changed(self) -> list[PolicyIssue] | None:
        """`reload()` when the file's content differs from the last content tried, else None. Reads the
        whole file: policy files are small, and a content hash catches edits that keep size and mtime."""
        try:
            text = self._read()
        except PolicyError:
            return None  # e.g. mid-rename by an editor; the next poll sees the new file
        if _digest(text) == self._file_digest:
            return None
        return self.reload()

    def watch(self, interval_s: float = 2.0) -> PolicyWatcher:
        """Start a background poller; use as a context manager (`with holder.watch(1.0): ...`)."""
        return PolicyWatcher(self, interval_s).start()

    def _read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise PolicyError(
                [PolicyIssue(str(self.path), None, "", f"cannot read policy file: {reason}")]
            ) from None

    def _rejected(self, issues: list[PolicyIssue]) -> list[PolicyIssue]:
        self.last_issues = list(issues)
        log.warning(
            "policy update rejected, keeping %r version %s:\n%s",
            self._policy.name,
            self._policy.version,
            "\n".join(str(i) for i in issues),
        )
        if self.on_reload is not None:
            self.on_reload(self.last_issues)
        return self.last_issues


class PolicyWatcher:
    """Polls `holder.reload_if_changed()` every `interval_s` on a daemon thread until `stop()`."""

    def __init__(self, holder: PolicyHolder, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.holder, self.interval_s = holder, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"policy-watch:{holder.path.name}", daemon=True
        )

    def start(self) -> PolicyWatcher:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Idempotent; waits for the thread to finish its current poll."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> PolicyWatcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.holder.reload_if_changed()
            except Exception:  # the watcher must outlive a bad poll; the old policy stays active
                log.exception("policy watch: reload of %s failed", self.holder.path)
