"""How an alerts consumer behaves: group and consumer names, retries, reclaiming, dedup window, reads.
`ConsumerConfig.for_handler` derives it from the settings (`alerts_*`)."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from monitor.alerts_handlers import Handler
from monitor.settings import Settings


@dataclass(frozen=True)
class ConsumerConfig:
    group: str  # e.g. featurewatch-alerts-webhook: one group per handler kind
    consumer: str  # this replica's name in the group
    max_attempts: int = 5  # deliveries before the dead-letter stream
    backoff_s: float = 1.0  # delay after the first failure, doubling per failure
    backoff_max_s: float = 30.0
    dedup_window_s: float = 60.0  # one delivery per (rule, tenant) per window; 0 off
    reclaim_idle_s: float = 120.0  # pending this long = its consumer died; must exceed
    #                                backoff_max_s plus the time one read batch can take
    block_s: float = 0.5  # XREADGROUP BLOCK; also bounds how late a retry or a stop request is noticed
    batch: int = 10  # entries per read: a hanging receiver holds a batch for batch x its timeout
    start_id: str = "$"  # where a new group starts: "$" alerts from now on, "0" the whole stream, or an id
    dead_maxlen: int = 100_000  # dead-letter entries kept (approximate trim)

    def __post_init__(self) -> None:
        if self.reclaim_idle_s <= self.backoff_max_s:  # else live consumers' retries would be taken over
            raise ValueError(f"reclaim_idle_s ({self.reclaim_idle_s}) must exceed backoff_max_s")

    @classmethod
    def for_handler(cls, s: Settings, handler: Handler, timeout_s: float = 0.0) -> ConsumerConfig:
        backoff_max = max(30.0, s.alerts_backoff_s)
        batch = cls.batch
        return cls(
            group=f"featurewatch-alerts-{handler.kind}",
            consumer=s.alerts_consumer or f"{socket.gethostname()}-{os.getpid()}",
            max_attempts=s.alerts_max_attempts,
            backoff_s=s.alerts_backoff_s,
            backoff_max_s=backoff_max,
            dedup_window_s=s.alerts_dedup_window_s,
            reclaim_idle_s=max(120.0, 2 * (backoff_max + batch * timeout_s)),
            # A group created on first start begins at this moment (stream ids are ms timestamps), not at
            # "$" when its thread gets there: alerts written meanwhile are not skipped, the backlog is.
            start_id=f"{int(time.time() * 1000)}-0",
        )
