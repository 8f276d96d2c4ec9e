"""The virtual phone's adbd: a TCP server speaking the real ADB transport protocol.

One process per phone (``python -m fedblocks.testbed.virtual.daemon_main --config FILE``),
started by :class:`fedblocks.testbed.virtual.VirtualPhone`. Threads: one accept loop,
one reader per connection, one per open stream service (plus its I/O pumps), a monitor
(10 Hz: sysfs model, low-memory killer, zombie reaping) and the CPU throttle.

Protocol behaviour (AOSP adb 29 / adb-shell 0.4.4 compatible):
- CNXN -> AUTH TOKEN; SIGNATURE verified against every authorized key, else a new token;
  RSAPUBLICKEY accepted only for an authorized key, otherwise the connection is closed.
  Nothing but CNXN/AUTH is honoured before authentication.
- Streams: OPEN -> OKAY(local, remote) or CLSE(0, remote). Flow control per direction:
  each host WRTE is acknowledged with OKAY when the service takes the data (always
  before any reply), and we keep at most one WRTE in flight per stream.
- Checksums: always written correctly, never required (adb >= 29 sends 0).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from ..adb import protocol as p
from . import proctree
from .lmk import MemoryKiller
from .namespace import enter_phone_namespace
from .profiles import PhoneProfile
from .sandbox import Sandbox
from .sysfs import SysfsModel
from .throttle import Throttle

FEATURES = ["shell_v2", "cmd"]
SHELL_V2_SDK = 24   # adbd gained shell_v2 and cmd in Android 7.0: older phones offer only `shell:` (v1)


def features_for(sdk: int) -> list[str]:
    """The feature list a real adbd of that Android version advertises (as far as we emulate it)."""
    return list(FEATURES) if sdk >= SHELL_V2_SDK else []
MAX_AUTH_FAILURES = 16
MONITOR_PERIOD_S = 0.1
IDLE_MONITOR_PERIOD_S = 1.0   # nothing running on the phone: nothing to measure or throttle


class StreamClosed(Exception):
    """The stream was closed (by either side) while a service used it."""


class Stream:
    """One logical ADB stream between a host socket and a device service."""

    def __init__(self, conn: Connection, local_id: int, remote_id: int) -> None:
        self.conn = conn
        self.local_id = local_id
        self.remote_id = remote_id
        self._cond = threading.Condition()
        self._inbox: deque[bytes] = deque()
        self._awaiting_okay = False
        self._write_lock = threading.Lock()
        self.closed = False
        self.closed_by_host = False
        self.on_host_close: Callable[[], None] | None = None

    # ---- called by the service thread
    def read(self, timeout: float | None = None) -> bytes:
        """Next host WRTE payload (acknowledged now); b"" once the stream is closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._inbox or self.closed, timeout):
                raise TimeoutError
            if not self._inbox:
                return b""
            data = self._inbox.popleft()
            closed = self.closed
        if not closed:  # a stream the host closed takes no more OKAYs; its payload is still delivered
            # Ack before the service can reply: adb-shell drops a WRTE that arrives while it waits for OKAY.
            self.conn.send(p.A_OKAY, self.local_id, self.remote_id)
        return data

    def write(self, data: bytes) -> None:
        """Send data as WRTEs of at most max_payload bytes, one in flight at a time."""
        with self._write_lock:
            view = memoryview(data)
            step = self.conn.max_payload
            for start in range(0, len(view), step):
                with self._cond:
                    self._cond.wait_for(lambda: not self._awaiting_okay or self.closed)
                    if self.closed:
                        raise StreamClosed
                    self._awaiting_okay = True
                self.conn.send(p.A_WRTE, self.local_id, self.remote_id, bytes(view[start:start + step]))

    def close(self) -> None:
        """Device-side close: send CLSE once."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self._cond.notify_all()
        self.conn.forget(self)
        self.conn.send(p.A_CLSE, self.local_id, self.remote_id)

    # ---- called by the connection reader
    def host_wrote(self, data: bytes) -> None:
        with self._cond:
            self._inbox.append(data)
            self._cond.notify_all()

    def host_okayed(self) -> None:
        with self._cond:
            self._awaiting_okay = False
            self._cond.notify_all()

    def host_closed(self, echo: bool = True) -> None:
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self.closed_by_host = True
            self._cond.notify_all()
        self.conn.forget(self)
        if echo:
            self.conn.send(p.A_CLSE, self.local_id, self.remote_id)
        if self.on_host_close is not None:
            try:
                self.on_host_close()
            except Exception as exc:  # a service's cleanup must not kill the reader thread
                log(f"stream {self.local_id}: cleanup failed: {exc!r}")


class Connection:
    """One TCP connection from a host (adb server or adb-shell)."""

    def __init__(self, daemon: AdbDaemon, sock: socket.socket, peer: str) -> None:
        self.daemon = daemon
        self.sock = sock
        self.peer = peer
        self._send_lock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self._streams_lock = threading.Lock()
        self.max_payload = p.MAX_PAYLOAD_LEGACY
        self.online = False
        self.alive = True
        self._token = b""
        self._auth_failures = 0

    # ------------------------------------------------------------- sending
    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        packet = p.pack_message(command, arg0, arg1, data)
        with self._send_lock:
            if not self.alive:
                raise StreamClosed
            try:
                self.sock.sendall(packet)
            except OSError as exc:
                self.alive = False
                raise StreamClosed from exc

    def forget(self, stream: Stream) -> None:
        with self._streams_lock:
            self._streams.pop(stream.local_id, None)

    # ------------------------------------------------------------- reading
    def _recv_exact(self, n: int) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < n:
            try:
                chunk = self.sock.recv(n - len(chunks))
            except OSError:
                return None
            if not chunk:
                return None
            chunks += chunk
        return bytes(chunks)

    def run(self) -> None:
        try:
            while self.daemon.running:
                raw = self._recv_exact(p.HEADER_SIZE)
                if raw is None:
                    break
                header = p.unpack_header(raw)
                data = self._recv_exact(header.data_length) if header.data_length else b""
                if data is None:
                    break
                if not self._handle(p.Message(header.command, header.arg0, header.arg1, data)):
                    break
        except p.ProtocolError as exc:
            log(f"{self.peer}: protocol error, dropping the connection: {exc}")
        except StreamClosed:
            pass
        except Exception as exc:  # a bug must cost one connection, not the phone
            log(f"{self.peer}: internal error, dropping the connection: {exc!r}")
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.alive = False
        with self._streams_lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.host_closed(echo=False)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.daemon.connection_ended(self)

    def _handle(self, msg: p.Message) -> bool:
        """Process one message; False ends the connection."""
        if msg.command == p.A_CNXN:
            return self._on_connect(msg)
        if msg.command == p.A_AUTH:
            return self._on_auth(msg)
        if not self.online:
            return True  # adbd ignores everything else until the transport is authenticated
        if msg.command == p.A_OPEN:
            self._on_open(msg)
        elif msg.command == p.A_WRTE:
            stream = self._stream(msg.arg1)
            if stream is not None and stream.remote_id == msg.arg0:
                stream.host_wrote(msg.data)
        elif msg.command == p.A_OKAY:
            stream = self._stream(msg.arg1)
            if stream is not None:
                if stream.remote_id == 0:
                    stream.remote_id = msg.arg0
                stream.host_okayed()
        elif msg.command == p.A_CLSE:
            stream = self._stream(msg.arg1)
            if stream is not None and stream.remote_id in (msg.arg0, 0):
                stream.host_closed()
        return True

    def _stream(self, local_id: int) -> Stream | None:
        with self._streams_lock:
            return self._streams.get(local_id)

    def _on_connect(self, msg: p.Message) -> bool:
        if self.online:  # a host reset: drop the old streams and authenticate again
            self.online = False
            with self._streams_lock:
                streams = list(self._streams.values())
            for stream in streams:
                stream.host_closed(echo=False)
        self.max_payload = max(p.MAX_PAYLOAD_LEGACY, min(msg.arg1, p.MAX_PAYLOAD))
        self._send_token()
        return True

    def _send_token(self) -> None:
        self._token = secrets.token_bytes(p.TOKEN_SIZE)
        self.send(p.A_AUTH, p.AUTH_TOKEN, 0, self._token)

    def _on_auth(self, msg: p.Message) -> bool:
        if self.online or not self._token:
            return True
        if msg.arg0 == p.AUTH_SIGNATURE:
            for key in self.daemon.authorized_keys.current():
                if p.verify_token_signature(key, self._token, msg.data):
                    return self._go_online()
            self._auth_failures += 1
            if self._auth_failures > MAX_AUTH_FAILURES:
                log(f"{self.peer}: too many failed signatures")
                return False
            self._send_token()
            return True
        if msg.arg0 == p.AUTH_RSAPUBLICKEY:
            try:
                offered = p.decode_android_pubkey(msg.data)
            except p.KeyFormatError as exc:
                log(f"{self.peer}: bad public key: {exc}")
                return False
            if any(offered.public_numbers() == k.public_numbers() for k in self.daemon.authorized_keys.current()):
                return self._go_online()
            # A real phone would show "Allow USB debugging?"; nobody is there to tap it.
            log(f"{self.peer}: refused an unknown public key")
            return False
        return True

    def _go_online(self) -> bool:
        self.online = True
        self._token = b""
        self.send(p.A_CNXN, p.A_VERSION, p.MAX_PAYLOAD, self.daemon.banner)
        log(f"{self.peer}: authenticated")
        return True

    def _on_open(self, msg: p.Message) -> None:
        from .services import start_service

        request = p.parse_service(msg.data)
        local_id = self.daemon.next_stream_id()
        stream = Stream(self, local_id, msg.arg0)
        service = start_service(self.daemon, stream, request)
        if service is None:
            self.send(p.A_CLSE, 0, msg.arg0)
            return
        with self._streams_lock:
            self._streams[local_id] = stream
        self.send(p.A_OKAY, local_id, msg.arg0)  # before the service can write anything
        threading.Thread(target=service, name=f"svc-{request.name}-{local_id}", daemon=True).start()


@dataclass(frozen=True)
class DaemonConfig:
    port: int
    profile: PhoneProfile
    root: Path
    state_file: Path
    serial: str
    authorized_keys: list[str]   # Android-format public key lines
    python: str
    host: str = "127.0.0.1"
    # Files re-read when they change, as adbd re-reads /data/misc/adb/adb_keys: a key that
    # appears after the phone started (adb creates ~/.android/adbkey on its first start) is accepted.
    key_files: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"port": self.port, "profile": json.loads(self.profile.to_json()), "root": str(self.root),
                           "state_file": str(self.state_file), "serial": self.serial,
                           "authorized_keys": self.authorized_keys, "python": self.python, "host": self.host,
                           "key_files": list(self.key_files)})

    @classmethod
    def from_json(cls, text: str) -> DaemonConfig:
        data = json.loads(text)
        return cls(int(data["port"]), PhoneProfile.from_json(json.dumps(data["profile"])), Path(data["root"]),
                   Path(data["state_file"]), data["serial"], list(data["authorized_keys"]), data["python"],
                   data.get("host", "127.0.0.1"), tuple(data.get("key_files", ())))


class AuthorizedKeys:
    """The keys a phone accepts: the lines it was started with plus the watched key files,
    re-read whenever one of them changes (checked at each authentication)."""

    def __init__(self, lines: list[str], files: tuple[str, ...]) -> None:
        self._fixed = [p.decode_android_pubkey(k) for k in lines]
        self._files = [Path(f) for f in files]
        self._stamps: tuple[tuple[float, int] | None, ...] = ()
        self._watched: list[rsa.RSAPublicKey] = []
        self._lock = threading.Lock()

    def current(self) -> list[rsa.RSAPublicKey]:
        with self._lock:
            stamps = tuple(_stamp(f) for f in self._files)
            if stamps != self._stamps:
                self._stamps = stamps
                self._watched = []
                for path in self._files:
                    try:
                        lines = path.read_text().splitlines() if path.is_file() else []
                    except (OSError, UnicodeDecodeError) as exc:
                        log(f"authorized keys {path}: {exc}")
                        continue
                    for line in lines:
                        line = line.strip().strip("\0")
                        if line and not line.startswith("#"):
                            try:
                                self._watched.append(p.decode_android_pubkey(line))
                            except p.KeyFormatError as exc:
                                log(f"authorized keys {path}: skipped a bad line: {exc}")
            return self._fixed + self._watched


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime, st.st_size)


class AdbDaemon:
    """Owns the listening socket, the sandbox and the resource models of one phone."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.profile = config.profile
        self.authorized_keys = AuthorizedKeys(config.authorized_keys, config.key_files)
        self.sandbox = Sandbox(config.root, config.profile, config.serial, config.python)
        self.sandbox.create()
        props = self.profile.properties()
        self.banner = p.connect_banner({"ro.product.name": props["ro.product.name"],
                                        "ro.product.model": props["ro.product.model"],
                                        "ro.product.device": props["ro.product.device"]},
                                       features_for(self.profile.sdk))
        self.running = True
        self._ids = 0
        self._ids_lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._conn_lock = threading.Lock()
        # Children we spawned and wait for ourselves; anything else re-parented to us is reaped by the monitor.
        self.spawn_lock = threading.Lock()
        self.spawned: set[int] = set()
        self.pid = os.getpid()
        self._scanner = proctree.PhoneScanner(self.pid)
        self.sysfs = SysfsModel(self.sandbox.root, self.profile, config.state_file)
        self.killer = MemoryKiller(self.profile.memory_budget_mb, self.sandbox.lmk_log)
        # Set when a command starts; cleared by the monitor once the phone has no process left.
        self.busy = threading.Event()
        # The throttle scans for itself, right before each hold: a command that started after
        # the monitor's last tick is held in its first period too, not only from the next tick.
        throttle_scanner = proctree.PhoneScanner(self.pid)
        self.throttle = Throttle(self.profile.cpu_speed, lambda: _live_pids(throttle_scanner.scan()),
                                 self.busy)
        self.listener: socket.socket | None = None

    def next_stream_id(self) -> int:
        with self._ids_lock:
            self._ids = self._ids % 0x7FFFFFFF + 1
            return self._ids

    def connection_ended(self, conn: Connection) -> None:
        with self._conn_lock:
            self._connections.discard(conn)

    def bind(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"port {self.config.port} is not free: {exc.strerror}") from exc
        sock.listen(16)
        self.listener = sock

    def serve_forever(self) -> None:
        assert self.listener is not None
        proctree.become_subreaper()
        self.sysfs.publish()
        self.throttle.start()
        threading.Thread(target=self._monitor, name="monitor", daemon=True).start()
        while self.running:
            try:
                sock, addr = self.listener.accept()
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self, sock, f"{addr[0]}:{addr[1]}")
            with self._conn_lock:
                self._connections.add(conn)
            threading.Thread(target=conn.run, name=f"conn-{addr[1]}", daemon=True).start()

    def stop(self) -> None:
        self.running = False
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
        self.drop_connections()
        self.throttle.stop()
        self.kill_all_processes()

    def drop_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            conn.alive = False
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def kill_all_processes(self) -> None:
        for info in proctree.descendants(self.pid):
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(info.pid, sig)
                except ProcessLookupError:
                    pass

    def _monitor(self) -> None:
        """10 Hz until stopped; exits the process when its parent is gone."""
        last = time.monotonic()
        previous_ticks: dict[int, int] = {}
        parent = os.getppid()
        while self.running:
            # 10 Hz while the phone runs anything, 1 Hz when idle (a spawn wakes us at once).
            if self.busy.is_set():
                time.sleep(MONITOR_PERIOD_S)
            else:
                self.busy.wait(IDLE_MONITOR_PERIOD_S)
            if os.getppid() != parent:  # whoever started us is gone: do not linger as an orphan server
                log("parent process exited; shutting down")
                self.stop()
                os._exit(0)
            now = time.monotonic()
            dt, last = now - last, now
            try:
                previous_ticks = self._monitor_tick(dt, previous_ticks)
            except Exception as exc:  # keep the models running whatever one tick hit
                log(f"monitor: {exc!r}")

    def _monitor_tick(self, dt: float, previous_ticks: dict[int, int]) -> dict[int, int]:
        """One tick: CPU ticks since the last one -> sysfs; RSS -> LMK; reap adopted zombies."""
        phone_trees = self._scanner.scan()
        ticks: dict[int, int] = {}
        used = 0
        for members in phone_trees.values():
            for info in members:
                ticks[info.pid] = info.cpu_ticks
                used += max(0, info.cpu_ticks - previous_ticks.get(info.pid, 0))
        try:
            self.sysfs.step(dt, used / proctree.CLOCK_TICKS / dt if dt > 0 else 0.0)
            self.sysfs.publish()
        except OSError as exc:
            log(f"sysfs: {exc}")
        self.killer.check(phone_trees)
        with self.spawn_lock:
            if not phone_trees and not self.spawned:
                self.busy.clear()   # only our descendants can add processes to the phone
            for infos in phone_trees.values():
                info = infos[0]   # the tree's root, a child of adbd
                if info.state == "Z" and info.pid not in self.spawned:
                    try:
                        os.waitpid(info.pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
        return ticks


def log(message: str) -> None:
    print(f"adbd[{os.getpid()}] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="virtual phone adbd (started by VirtualPhone)")
    parser.add_argument("--config", required=True, help="JSON DaemonConfig file")
    args = parser.parse_args(argv)
    config = DaemonConfig.from_json(Path(args.config).read_text())
    daemon = AdbDaemon(config)
    # Before any thread exists: unshare/chroot apply to the calling thread only.
    if enter_phone_namespace(daemon.sandbox.real_root, config.root.parent / "nsroot"):
        daemon.sandbox.mode = "namespace"
    log(f"path mapping: {daemon.sandbox.mode}")
    try:
        daemon.bind()
    except OSError as exc:
        print(f"ERROR {exc}", flush=True)
        return 2

    def _terminate(signum: int, _frame: object) -> None:
        daemon.stop()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    print(f"READY {config.host}:{config.port} {daemon.sandbox.mode}", flush=True)
    daemon.serve_forever()
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _live_pids(phone_trees: dict[int, list[proctree.ProcInfo]]) -> list[int]:
    return [info.pid for infos in phone_trees.values() for info in infos if info.state not in ("Z", "X")]
