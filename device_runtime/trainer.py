"""The training child: loads the stage, trains, writes progress lines and the weights.

Runs in its own process so the supervisor (runner.py) can sample its memory and
kill it like Android's low-memory killer would. Every event is one JSON line,
flushed at once, in the progress file; whatever was written before a kill survives.

Events: started, loaded, step (one per training step), trained, done | failed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import procfs
from .data import BatchAugmenter, DataError, batch_indices, load_shard
from .engines.base import EngineError
from .job import JobError, parse_job
from .weights import WeightsError, load_weights, save_weights, validate_weights

EXIT_DONE = 0
EXIT_FAILED = 3
ENGINE_MODULES = {"ort": "onnxruntime", "executorch": "executorch", "torch": "torch"}


class TrainingFailed(Exception):
    """Training stopped for a reason the bundle reports (status `failed`)."""


class Progress:
    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "t": time.monotonic(), **fields}
        self.stream.write(json.dumps(record, allow_nan=False) + "\n")
        self.stream.flush()


def engine_version(engine: str) -> str | None:
    module = sys.modules.get(ENGINE_MODULES.get(engine, ""))
    version = getattr(module, "__version__", None)
    return str(version) if version is not None else None


def train(plan_path: Path, staging: Path, progress: Progress) -> None:
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    job = parse_job(plan, plan_path.parent)
    progress.emit("started", pid=os.getpid())
    if job.split is not None:  # SmartSplit: the front of the model here, the rest on the server
        from .split_job import train_split

        return train_split(job, staging, progress)

    t0 = time.monotonic()
    data = load_shard(job.data.path, job.stage)
    weights = load_weights(job.init_weights.path, job.stage)
    num_samples = len(next(iter(data.values())))
    data_load_s = time.monotonic() - t0

    from .engines import load_engine  # the engine import is part of the model-load time
    from .engines.base import trim_heap

    t0 = time.monotonic()
    try:
        engine = load_engine(job.engine, job.stage, {role: str(ref.path) for role, ref in job.artifacts.items()},
                             job.training.optimizer)
        engine.set_weights(weights)
    except ImportError as exc:
        raise TrainingFailed(f"engine '{job.engine}' is not installed on this device ({exc})") from exc
    model_load_s = time.monotonic() - t0
    del weights

    # The batch order (one permutation per epoch, 8 bytes per sample) is drawn before the baseline,
    # so the sampler's code pages are not counted as training memory.
    order = list(batch_indices(num_samples, job.stage.batch_size, job.training.seed,
                               job.training.epochs, job.training.max_steps))
    augment = BatchAugmenter(job.training.augment, job.training.seed)

    # Peak memory from here on is the training footprint: reset VmHWM after load.
    trim_heap()
    peak_reset = procfs.reset_peak("self")
    mem = procfs.read_memory("self")
    planned = len(order)
    progress.emit("loaded", data_load_s=data_load_s, model_load_s=model_load_s,
                  baseline_rss_bytes=mem.rss_bytes if mem else None,
                  baseline_anon_bytes=mem.anon_bytes if mem else None, peak_reset=peak_reset,
                  cpu_s=procfs.cpu_seconds("self"), engine_version=engine_version(job.engine),
                  num_samples=num_samples, steps_planned=planned)

    steps = 0
    for i, idx in enumerate(order):
        batch = augment({name: arr[idx] for name, arr in data.items()})
        c_start, t_start = time.process_time(), time.monotonic()
        loss = float(engine.step(batch))
        t_end, c_end = time.monotonic(), time.process_time()
        finite = math.isfinite(loss)
        progress.emit("step", i=i, loss=loss if finite else None, latency_s=t_end - t_start,
                      cpu_s=c_end - c_start, t_start=t_start)
        steps += 1
        del batch  # one batch alive at a time: the next one is gathered after this one is freed
        if not finite:
            raise TrainingFailed(f"non-finite loss ({loss}) at step {i}; training stopped "
                                 "(lower the learning rate or check the data)")

    mem = procfs.read_memory("self")
    progress.emit("trained", steps=steps, hwm_bytes=mem.hwm_bytes if mem else None,
                  rss_bytes=mem.rss_bytes if mem else None, cpu_s=procfs.cpu_seconds("self"))

    updated = {name: np.asarray(arr) for name, arr in engine.get_weights().items()}
    try:
        validate_weights(updated, job.stage, "updated weights")
    except WeightsError as exc:
        raise TrainingFailed(f"engine '{job.engine}' returned bad weights: {exc}") from exc
    save_weights(staging / "weights.npz", updated)
    engine.close()
    progress.emit("done")


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the supervisor dies (Linux/Android prctl)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's own cleanup still kills the child on a normal exit


def child_main(plan_path: str, staging: str) -> int:
    """Entry of `python -m fedblocks.device_runtime _train PLAN STAGING`."""
    die_with_parent()
    staging_dir = Path(staging)
    with open(staging_dir / "progress.jsonl", "a", encoding="utf-8") as stream:
        progress = Progress(stream)
        try:
            train(Path(plan_path), staging_dir, progress)
            return EXIT_DONE
        except (TrainingFailed, DataError, WeightsError, JobError) as exc:
            progress.emit("failed", reason=str(exc))
        except EngineError as exc:
            traceback.print_exc(file=sys.stderr)
            progress.emit("failed", reason=str(exc)[:1000])  # adapters' messages name the engine
        except MemoryError:
            progress.emit("failed", reason="out of memory inside the engine (MemoryError)")
        except Exception as exc:  # engine errors and anything unexpected: reported, never a crash
            traceback.print_exc(file=sys.stderr)
            reason = f"{type(exc).__name__}: {exc}".strip().splitlines()
            progress.emit("failed", reason=(reason[0] if reason else type(exc).__name__)[:500])
        return EXIT_FAILED
