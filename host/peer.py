"""Round sessions: server-side work a strategy runs while a round's jobs train (SmartSplit's server segments).

Generic on purpose: the round loop (host/loop.py) asks a strategy for a RoundSession,
asks it for every job's PeerEndpoint (written into job.json by the executor), and merges
what `finish` returns into the clients' results. It knows nothing of what the session
does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PeerEndpoint:
    """A server a client's job talks to while it trains (a strategy's round session).

    `job_fields(host, port)` gives the extra job.json fields for the job, with the server's
    address as the DEVICE sees it: the executor passes `host`/`port` unchanged for a direct
    connection, or the device-side port it mapped with `adb reverse` (`via = "reverse"`).
    """

    host: str
    port: int
    job_fields: Callable[[str, int], Mapping[str, Any]]
    via: str = "direct"  # direct | reverse


@dataclass(frozen=True)
class SessionResult:
    """What the server side of a round contributes to one client's update."""

    tensors: Mapping[str, np.ndarray]
    metrics: Mapping[str, Any] = field(default_factory=dict)


class RoundSession(ABC):
    """Server-side work a strategy runs during one round (SmartSplit: the server segments).

    The loop asks `endpoint` for every job it starts, hands every job's status (`ok` =
    the bundle was accepted) and metrics.json to `finish`, and merges each SessionResult's
    tensors into that client's result before `aggregate`; an accepted client without a
    SessionResult is excluded. `close` is always called, also when the round failed.
    """

    @abstractmethod
    def endpoint(self, client_id: int, job_id: str, steps: int) -> PeerEndpoint:
        """Where the job connects; `steps` is how many training steps it will run."""

    @abstractmethod
    def finish(self, statuses: Mapping[int, str], metrics: Mapping[int, Mapping[str, Any]]) -> dict[int, SessionResult]:
        """Results of the accepted clients whose server side completed; the rest are discarded."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sockets and threads."""
