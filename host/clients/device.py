"""A phone as a federated client: push what it lacks, start the device runtime detached, poll, pull.

Same code for virtual phones (an adbd on 127.0.0.1) and real ones (adb over USB/TCP):
everything goes through fedblocks.testbed's Device interface.

Per job:
1. the content-addressed cache (DeviceCache) gets the runtime zipapp, the stage
   artifacts, the client's shard and the initial weights (each pushed once, sha256 verified);
2. job.json (docs/formats.md) is pushed into a per-job work directory;
3. `python3 <runtime.pyz> run job.json` starts as a detached job (start_job); the
   host polls it until it ends, the round deadline passes (killed: a straggler), or
   the round is cancelled;
4. the result bundle's files are pulled (sha256-verified transfer) into the host's
   bundle directory, where the loop validates them like any untrusted input.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedblocks.host.clients.base import ClientDescription, ClientExecutor, FileOnHost, JobOutcome, JobRequest

BUNDLE_FILES = ("status.json", "metrics.json", "weights.npz")
POLL_S = 0.5


@dataclass(frozen=True)
class RuntimeBundle:
    """The device runtime zipapp on the host, and how the device starts Python."""

    pyz: FileOnHost
    python: str = "python3"
    power_profile: dict[str, Any] | None = None


class DeviceClient(ClientExecutor):
    kind = "device"

    def __init__(self, client_id: int, budget_mb: float | None, device: Any, runtime: RuntimeBundle,
                 label: str | None = None, profile: str | None = None) -> None:
        from fedblocks.testbed.cache import DeviceCache

        super().__init__(client_id, budget_mb, label or str(device.serial))
        self.device = device
        self.cache = DeviceCache(device)
        self.runtime = runtime
        self.profile = profile  # a virtual phone's profile name (None for a real phone)
        self._lock = threading.Lock()  # one job at a time per phone
        self._reversed: list[int] = []  # device ports `adb reverse` maps for the running job

    def _ensure(self, f: FileOnHost) -> tuple[str, int]:
        before = self.cache.stats.bytes_pushed
        remote = self.cache.ensure(f.path, f.sha256)
        return remote, self.cache.stats.bytes_pushed - before

    def job_json(self, request: JobRequest, remote: dict[str, str]) -> dict[str, Any]:
        o = request.optimizer
        meters: dict[str, Any] = {}
        if self.runtime.power_profile is not None:
            meters["power_profile"] = self.runtime.power_profile
        return {
            "format": "fedblocks.job", "version": 1, "job_id": request.job_id, "engine": request.engine,
            "stage": request.stage_dict,
            "artifacts": {role: {"path": remote[f"artifact:{role}"], "sha256": f.sha256}
                          for role, f in request.artifacts.items()},
            "data": {"path": remote["data"], "sha256": request.shard.sha256},
            "init_weights": {"path": remote["init_weights"], "sha256": request.init_weights.sha256},
            "training": {"epochs": request.epochs, "max_steps": request.max_steps,
                         "batch_size": request.batch_size, "seed": request.seed, "augment": request.augment,
                         "optimizer": {"name": o.name, "lr": o.lr, "momentum": o.momentum,
                                       "weight_decay": o.weight_decay}},
            "budget_mb": request.budget_mb,
            "budget_applies_to": request.budget_mode,
            "timeout_s": request.deadline_s,
            "meters": meters,
            "output_dir": "result",
        }

    def run(self, request: JobRequest, cancel: threading.Event) -> JobOutcome:
        from fedblocks.testbed.errors import TestbedError

        t0 = time.monotonic()
        with self._lock:
            try:
                return self._run(request, cancel, t0)
            except (TestbedError, OSError, ValueError) as exc:
                return JobOutcome(None, time.monotonic() - t0, error=f"{type(exc).__name__}: {exc}"[:400])
            finally:
                self._unmap_reverse()

    def describe(self) -> ClientDescription:
        from fedblocks.testbed.errors import TestbedError

        try:
            props = self.device.properties()
        except (TestbedError, OSError, ValueError):
            return ClientDescription(profile=self.profile)
        return ClientDescription(model=props.model, soc=props.soc, abi=props.abi,
                                 ram_mb=None if props.ram_mb is None else float(props.ram_mb), profile=self.profile)

    def _job_with_peer(self, request: JobRequest, remote: dict[str, str]) -> dict[str, Any]:
        """job.json, plus the fields of the server the job talks to (request.peer), addressed as the
        phone sees it: directly, or through a port `adb reverse` maps to the host's."""
        job = self.job_json(request, remote)
        peer = request.peer
        if peer is not None:
            host, port = peer.host, peer.port
            if peer.via == "reverse":
                port = self.device.reverse(0, peer.port)
                self._reversed.append(port)
                host = "127.0.0.1"
            job.update(peer.job_fields(host, port))
        return job

    def _unmap_reverse(self) -> None:
        from fedblocks.testbed.errors import TestbedError

        while self._reversed:
            port = self._reversed.pop()
            try:
                self.device.remove_reverse(port)
            except (TestbedError, OSError):
                pass  # the phone went away: its mappings went with it

    def _run(self, request: JobRequest, cancel: threading.Event, t0: float) -> JobOutcome:
        pushed = 0
        remote: dict[str, str] = {}
        for key, f in [("pyz", self.runtime.pyz), ("data", request.shard), ("init_weights", request.init_weights),
                       *((f"artifact:{role}", ref) for role, ref in sorted(request.artifacts.items()))]:
            remote[key], nbytes = self._ensure(f)
            pushed += nbytes
        workdir = f"{self.device.base_dir}/work/{request.job_id}"
        self.device.remove(workdir)
        self.device.makedirs(workdir)
        with tempfile.TemporaryDirectory() as tmp:
            job_path = Path(tmp) / "job.json"
            job_path.write_text(json.dumps(self._job_with_peer(request, remote), indent=1), encoding="utf-8")
            self.device.push(job_path, f"{workdir}/job.json")
            pushed += job_path.stat().st_size
        push_s = time.monotonic() - t0
        cmd = f"{self.runtime.python} {shlex.quote(remote['pyz'])} run job.json"
        handle = self.device.start_job(cmd, workdir, job_id=request.job_id)
        straggler_reason: str | None = None
        while True:
            status = self.device.poll_job(handle)
            if not status.running:
                break
            if cancel.is_set():
                straggler_reason = "cancelled by the round loop"
            elif request.deadline_s is not None and time.monotonic() - t0 > request.deadline_s:
                straggler_reason = f"missed the round deadline of {request.deadline_s:.0f} s"
            if straggler_reason:
                self.device.kill_job(handle)
                return JobOutcome(None, time.monotonic() - t0, straggler=True, error=straggler_reason,
                                  bytes_pushed=pushed, push_s=push_s)
            time.sleep(POLL_S)
        bundle_remote = f"{workdir}/result"
        if not self.device.exists(f"{bundle_remote}/status.json"):
            tail = status.log_tail.strip().splitlines()[-3:]
            return JobOutcome(None, time.monotonic() - t0, error=f"job {status.state} (exit {status.exit_code}) "
                              f"without a result bundle: {' | '.join(tail)[:300]}", bytes_pushed=pushed,
                              push_s=push_s)
        pulled = 0
        t_pull = time.monotonic()
        request.bundle_dir.mkdir(parents=True, exist_ok=True)
        for name in BUNDLE_FILES:
            if self.device.exists(f"{bundle_remote}/{name}"):
                local = request.bundle_dir / name
                self.device.pull(f"{bundle_remote}/{name}", local)
                pulled += local.stat().st_size
        pull_s = time.monotonic() - t_pull
        self.device.remove(workdir)
        return JobOutcome(request.bundle_dir, time.monotonic() - t0, bytes_pushed=pushed, bytes_pulled=pulled,
                          push_s=push_s, pull_s=pull_s, extra={"exit_code": status.exit_code, "state": status.state})

    def close(self) -> None:
        close = getattr(self.device, "close", None)
        if callable(close):
            close()
