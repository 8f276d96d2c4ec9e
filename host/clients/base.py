"""What the round loop hands a client executor, and what it gets back.

Every executor (simulated, device) ends a job the same way: a result bundle
directory (status.json, metrics.json, weights.npz — docs/formats.md) at
`request.bundle_dir`, which the loop then validates like any untrusted bundle.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedblocks.device_runtime.spec import OptimizerConfig, StageSpec


@dataclass(frozen=True)
class FileOnHost:
    path: Path
    sha256: str


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    client_id: int
    round: int
    engine: str
    stage: StageSpec
    stage_dict: dict[str, Any]  # the manifest's stage entry, verbatim (goes into job.json)
    artifacts: dict[str, FileOnHost]  # role -> file (empty for the simulated testbed)
    shard: FileOnHost
    num_samples: int
    init_weights: FileOnHost
    epochs: int
    max_steps: int | None
    batch_size: int
    seed: int
    optimizer: OptimizerConfig
    budget_mb: float | None  # None: not enforced (FedAvg's unconstrained reference)
    budget_mode: str  # "footprint" (training memory above baseline) | "process" (whole RSS)
    deadline_s: float | None
    bundle_dir: Path  # where the finished (pulled) bundle must end up
    augment: str = "none"  # device_runtime.data.AUGMENTATIONS, applied to every batch
    peer: Any = None  # host/peer.py PeerEndpoint: a server the job talks to (a strategy's round session)


@dataclass
class JobOutcome:
    """How the job ended from the host's point of view (the bundle says how training went)."""

    bundle_dir: Path | None
    wall_s: float
    straggler: bool = False  # missed the round deadline (killed, excluded)
    error: str | None = None  # transport / device problem (no bundle)
    bytes_pushed: int = 0
    bytes_pulled: int = 0
    push_s: float | None = None  # host clock: artifacts, shard, weights and job.json onto the device
    pull_s: float | None = None  # host clock: the result bundle back
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientDescription:
    """What the run store's devices table says about a client (None: not known)."""

    model: str | None = None
    soc: str | None = None
    abi: str | None = None
    ram_mb: float | None = None
    profile: str | None = None


class ClientExecutor(ABC):
    """Runs one client's jobs (a simulated client, or a phone)."""

    kind: str = ""

    def __init__(self, client_id: int, budget_mb: float | None, label: str) -> None:
        self.client_id = client_id
        self.budget_mb = budget_mb
        self.label = label

    @abstractmethod
    def run(self, request: JobRequest, cancel: threading.Event) -> JobOutcome:
        """Run the job to completion, the deadline, or until `cancel` is set."""

    def describe(self) -> ClientDescription:
        """The device behind this client, for the run store (read once, when the run starts)."""
        return ClientDescription()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
