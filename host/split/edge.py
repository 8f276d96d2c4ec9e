"""The edge server: runs the server segments of many phones at once, over the split framing.

One `EdgeServer` per round listens on a TCP port (127.0.0.1 for virtual phones, reached
through `adb reverse` by real ones). For every job the round starts it holds a session:
the job's token, its cut and a private copy of the server segment (`split_back-<cut>`,
built from the round's global weights) with its own SGD state. A connection that says
HELLO with a session's token (and the session's job id, cut, batch size and activation
shape) trains that copy batch by batch (device_runtime/framing.py):
ACTIVATION + LABELS in, a server step (export.stages.cut_gradient_step), GRADIENT + LOSS
out. DONE after the planned number of steps -> ACK, and only then is the session
complete.

Consistency when a phone drops: a session whose connection breaks, times out, sends a
bad frame or ends early is ABORTED; its copy of the server segment is thrown away, and
`results()` returns only complete sessions. The global weights are never touched by a
session, so one phone's partial round cannot leak into another phone's segment or into
the aggregate. A token works once: a reconnect cannot resume or replay a session.

Threads: one accept loop, one thread per connection; server steps of different
sessions run concurrently, at most `max_parallel` at a time (torch's intra-op threads
already use the cores).
"""

from __future__ import annotations

import copy
import hmac
import math
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedblocks.device_runtime import framing
from fedblocks.device_runtime.spec import OptimizerConfig


@dataclass
class ServerSession:
    """One phone's server segment for one round."""

    client_id: int
    job_id: str
    cut: str
    token: str
    program: Any  # a split_back StageProgram holding the round's global weights
    optimizer: OptimizerConfig
    steps: int  # planned training steps
    batch_size: int
    activation_shape: tuple[int, ...]
    num_classes: int
    status: str = "open"  # open | connected | complete | aborted
    reason: str = ""
    steps_done: int = 0
    losses: list[float] = field(default_factory=list)
    server_s: float = 0.0  # server compute, forward + backward + step
    bytes_in: int = 0
    bytes_out: int = 0
    connected_at: float | None = None
    ended_at: float | None = None

    def metrics(self) -> dict[str, Any]:
        return {"cut": self.cut, "status": self.status, "reason": self.reason, "steps": self.steps_done,
                "steps_planned": self.steps, "server_s": round(self.server_s, 6),
                "server_step_s_mean": round(self.server_s / self.steps_done, 6) if self.steps_done else None,
                "bytes_from_device": self.bytes_in, "bytes_to_device": self.bytes_out,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None,
                "wall_s": None if self.connected_at is None or self.ended_at is None
                else round(self.ended_at - self.connected_at, 6)}


class EdgeServer:
    """TCP server for one round's server segments (module doc)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, max_parallel: int = 2, io_timeout_s: float = 300.0,
                 max_frame_bytes: int = framing.DEFAULT_MAX_PAYLOAD_BYTES,
                 on_batch: Callable[[ServerSession, int], None] | None = None) -> None:
        self.host = host
        self._port = port
        self.io_timeout_s = io_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self._compute = threading.BoundedSemaphore(max(1, max_parallel))
        self._sessions: dict[str, ServerSession] = {}  # job_id -> session
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._running = False
        self.on_batch = on_batch  # test hook: called after each server step (fault injection)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EdgeServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        sock.listen(64)
        sock.settimeout(0.5)
        self._sock = sock
        self._running = True
        t = threading.Thread(target=self._accept_loop, name="edge-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("edge server not started")
        return int(self._sock.getsockname()[1])

    def close(self) -> None:
        self._running = False
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for t in self._threads:
            t.join(timeout=10)
        with self._lock:
            for s in self._sessions.values():
                if s.status in ("open", "connected"):
                    self._abort(s, "round ended before the phone finished")

    def __enter__(self) -> EdgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sessions
    def open_session(self, client_id: int, job_id: str, cut: str, program: Any, optimizer: OptimizerConfig,
                     steps: int, batch_size: int, activation_shape: tuple[int, ...], num_classes: int) -> ServerSession:
        session = ServerSession(client_id, job_id, cut, secrets.token_hex(16), program, optimizer, steps, batch_size,
                                tuple(activation_shape), num_classes)
        with self._lock:
            if job_id in self._sessions:
                raise ValueError(f"edge server: a session for job {job_id} exists already")
            self._sessions[job_id] = session
        return session

    def sessions(self) -> list[ServerSession]:
        with self._lock:
            return list(self._sessions.values())

    def results(self, client_ids: Sequence[int] | None = None) -> dict[int, ServerSession]:
        """The COMPLETE sessions (of `client_ids`, default all), by client id."""
        with self._lock:
            return {s.client_id: s for s in self._sessions.values()
                    if s.status == "complete" and (client_ids is None or s.client_id in client_ids)}

    def _abort(self, session: ServerSession, reason: str) -> None:
        if session.status in ("complete", "aborted"):
            return
        session.status = "aborted"
        session.reason = reason[:300]
        session.ended_at = time.monotonic()
        session.program = None  # the partial server segment is discarded

    # ------------------------------------------------------------------ connections
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while self._running:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with self._lock:
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="edge-conn", daemon=True)
            t.start()
            self._threads.append(t)

    def _lookup(self, hello: Mapping[str, Any]) -> ServerSession:
        job_id, token = hello.get("job_id"), hello.get("token")
        if not isinstance(job_id, str) or not isinstance(token, str):
            raise framing.FrameError("HELLO needs a job_id and a token")
        with self._lock:
            session = self._sessions.get(job_id)
        if session is None or not hmac.compare_digest(session.token.encode(), token.encode()):
            raise framing.FrameError(f"no session for job {job_id!r} with that token")
        if session.status != "open":
            raise framing.FrameError(f"session for job {job_id} is {session.status} (a token works once)")
        if hello.get("cut") != session.cut or hello.get("batch_size") != session.batch_size or \
                tuple(hello.get("activation_shape") or ()) != session.activation_shape:
            raise framing.FrameError(f"job {job_id}: HELLO does not match the session (cut {session.cut}, batch "
                                     f"{session.batch_size}, activation {list(session.activation_shape)})")
        return session

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire = framing.FrameSocket(conn, self.max_frame_bytes, self.io_timeout_s)
        session: ServerSession | None = None
        try:
            hello = wire.recv(framing.MSG_HELLO)
            session = self._lookup(hello.meta or {})
            session.status = "connected"
            session.connected_at = time.monotonic()
            wire.send_json(framing.MSG_WELCOME, 0, {"cut": session.cut, "steps": session.steps})
            self._train(session, wire)
            session.status = "complete"
            session.ended_at = time.monotonic()
            wire.send_json(framing.MSG_ACK, session.steps_done, {"steps": session.steps_done})
        except (framing.FrameError, framing.PeerClosed, ValueError) as exc:
            if session is not None:
                self._abort(session, str(exc))
            try:
                wire.send_json(framing.MSG_ERROR, 0, {"reason": str(exc)[:300]})
            except (framing.PeerClosed, framing.FrameError, OSError):
                pass
        except Exception as exc:  # a server bug costs this phone's round, never the server
            if session is not None:
                self._abort(session, f"edge server error: {type(exc).__name__}: {exc}")
        finally:
            if session is not None:
                session.bytes_in, session.bytes_out = wire.bytes_received, wire.bytes_sent
            wire.close()
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def _train(self, session: ServerSession, wire: framing.FrameSocket) -> None:
        from fedblocks.export.stages import cut_gradient_step

        program = session.program
        program.train()
        params = [p for p in program.parameters() if p.requires_grad]
        o = session.optimizer
        sgd = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        for i in range(session.steps + 1):
            frame = wire.recv((framing.MSG_ACTIVATION, framing.MSG_DONE), step=i)
            if frame.kind == framing.MSG_DONE:
                if i != session.steps:
                    raise framing.FrameError(f"DONE after {i} steps, the job planned {session.steps}")
                return
            if i == session.steps:
                raise framing.FrameError(f"more than the planned {session.steps} steps")
            if tuple(frame.array.shape) != session.activation_shape:  # type: ignore[union-attr]
                raise framing.FrameError(f"ACTIVATION shape {list(frame.array.shape)} is not "  # type: ignore[union-attr]
                                         f"{list(session.activation_shape)}")
            labels = wire.recv(framing.MSG_LABELS, step=i, shape=(session.batch_size,)).array
            assert labels is not None
            if labels.min() < 0 or labels.max() >= session.num_classes:
                raise framing.FrameError(f"LABELS outside 0..{session.num_classes - 1}")
            t0 = time.monotonic()
            with self._compute:
                loss, dz, _ = cut_gradient_step(program, torch.from_numpy(np.array(frame.array)),
                                                torch.from_numpy(np.array(labels)), sgd)
            session.server_s += time.monotonic() - t0
            value = float(loss)
            if not math.isfinite(value):
                raise framing.FrameError(f"server loss is not finite at step {i}")
            wire.send_array(framing.MSG_GRADIENT, i, dz.numpy())
            wire.send_array(framing.MSG_LOSS, i, np.asarray(value, dtype=np.float32))
            session.losses.append(value)
            session.steps_done = i + 1
            if self.on_batch is not None:
                self.on_batch(session, i)
        raise framing.FrameError("no DONE after the last step")  # unreachable: the loop returns or raises


def server_program(template: Any, weights: Mapping[str, np.ndarray]) -> Any:
    """A private copy of a split_back program holding `weights` (frozen + trainable, all of them)."""
    program = copy.deepcopy(template)
    program.load_global_state(dict(weights), strict=True)
    return program


def session_tensors(session: ServerSession) -> dict[str, np.ndarray]:
    """The server segment's trained tensors (trainable + running statistics), by global name."""
    program = session.program
    state = program.global_state()
    names = [t.name for t in program.trainable_specs()] + [s.name for s in program.state_specs()]
    return {n: state[n].detach().numpy().astype(np.float32, copy=True) for n in names}
