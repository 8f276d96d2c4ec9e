"""Device services behind OPEN: shell (v1 and v2), exec, sync, reverse, and polite root/reboot.

Each service is a callable run on its own thread with its Stream; it returns when the
stream is done (and has closed it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import socket
import stat
import struct
import subprocess
import termios
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..adb import protocol as p
from .sandbox import SandboxEscape

if TYPE_CHECKING:
    from .adbd import AdbDaemon, Stream

Service = Callable[[], None]


def start_service(daemon: AdbDaemon, stream: Stream, request: p.ServiceRequest) -> Service | None:
    """The service for an OPEN destination, or None to refuse it (CLSE)."""
    name = request.name
    if name == "shell":
        args = set(request.args)
        use_pty = "pty" in args or ("raw" not in args and not request.command)
        term = next((a.split("=", 1)[1] for a in request.args if a.startswith("TERM=")), "dumb")
        return ShellService(daemon, stream, request.command, v2="v2" in args, use_pty=use_pty, term=term).run
    if name == "exec":
        return ShellService(daemon, stream, request.command, v2=False, use_pty=False, term="dumb").run
    if name == "sync":
        return SyncService(daemon, stream).run
    if name == "root":
        return _reply(stream, b"adbd cannot run as root in production builds\n")
    if name == "unroot":
        return _reply(stream, b"adbd not running as root\n")
    if name == "reboot":
        return _reboot(daemon, stream)
    if name == "reverse":
        return _reverse(daemon, stream, request.command)
    return None


def _reply(stream: Stream, text: bytes) -> Service:
    def run() -> None:
        with contextlib.suppress(Exception):
            stream.write(text)
        stream.close()
    return run


def _reboot(daemon: AdbDaemon, stream: Stream) -> Service:
    """Like a reboot seen over adb: every process dies and every connection drops."""
    def run() -> None:
        stream.close()
        daemon.kill_all_processes()
        daemon.drop_connections()
    return run


# ------------------------------------------------------------------ reverse (adb reverse)
def _protocol_string(text: str) -> bytes:
    data = text.encode()
    return f"{len(data):04x}".encode() + data


class ReverseListener:
    """`adb reverse tcp:D tcp:H`: a socket on the phone's 127.0.0.1:D whose connections become
    streams the phone OPENs towards the host ("tcp:H"), over the connection that asked for it.

    Like AOSP adbd, a listener belongs to its ADB connection and goes away with it."""

    def __init__(self, daemon: AdbDaemon, conn: object, port: int, target: str) -> None:
        self.daemon = daemon
        self.conn = conn
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(("127.0.0.1", port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.port = int(self.sock.getsockname()[1])
        self.closed = False
        threading.Thread(target=self._accept, name=f"reverse-{self.port}", daemon=True).start()

    @property
    def spec(self) -> str:
        return f"tcp:{self.port}"

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def _accept(self) -> None:
        while not self.closed and self.daemon.running and getattr(self.conn, "alive", False):
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=self._bridge, args=(client,), daemon=True).start()
        with _REVERSE_LOCK:
            if _REVERSE.get(self.port) is self:
                del _REVERSE[self.port]
        self.close()

    def _bridge(self, client: socket.socket) -> None:
        from .adbd import Stream, StreamClosed

        conn = self.conn
        stream = Stream(conn, self.daemon.next_stream_id(), 0)  # type: ignore[arg-type]
        stream._awaiting_okay = True  # the host's OKAY to our OPEN carries its stream id
        with conn._streams_lock:  # type: ignore[attr-defined]
            conn._streams[stream.local_id] = stream  # type: ignore[attr-defined]

        def shut() -> None:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

        # No on_host_close hook: the host's CLSE often follows its last WRTE at once (the edge
        # server's ACK, then close), and shutting the app's socket from the reader thread lost
        # that payload whenever host_to_phone had not written it yet. Like adbd's local_socket,
        # host_to_phone drains what the host sent, then shuts the socket.
        try:
            conn.send(p.A_OPEN, stream.local_id, 0, self.target.encode() + b"\0")  # type: ignore[attr-defined]
        except StreamClosed:
            client.close()
            return

        def host_to_phone() -> None:
            while True:
                data = stream.read()
                if not data:
                    break
                try:
                    client.sendall(data)
                except OSError:
                    break
            shut()

        reader = threading.Thread(target=host_to_phone, daemon=True)
        reader.start()
        try:
            while True:
                data = client.recv(256 * 1024)
                if not data:
                    break
                stream.write(data)
        except (OSError, StreamClosed):
            pass
        stream.close()
        reader.join(timeout=5)
        client.close()


_REVERSE: dict[int, ReverseListener] = {}
_REVERSE_LOCK = threading.Lock()


def _tcp_port(spec: str) -> int | None:
    if not spec.startswith("tcp:"):
        return None
    try:
        port = int(spec[4:])
    except ValueError:
        return None
    return port if 0 <= port <= 65535 else None


def _reverse(daemon: AdbDaemon, stream: Stream, command: str) -> Service:
    """reverse:forward[:norebind]:tcp:D;tcp:H | reverse:killforward:tcp:D | killforward-all | list-forward.

    Replies like AOSP adbd (adb.cpp handle_forward_request on the device side): "OKAY" (+ the
    port as a length-prefixed string when D was 0), or "FAIL" + a length-prefixed message;
    list-forward: only the length-prefixed "(reverse) tcp:D tcp:H" lines (adbd sends no OKAY
    there; the adb server already did)."""
    def fail(message: str) -> bytes:
        return b"FAIL" + _protocol_string(message)

    def answer() -> bytes:
        conn = stream.conn
        if command == "list-forward":
            with _REVERSE_LOCK:
                lines = "".join(f"(reverse) {r.spec} {r.target}\n" for r in _REVERSE.values() if not r.closed)
            return _protocol_string(lines)
        if command == "killforward-all":
            with _REVERSE_LOCK:
                mine = [port for port, r in _REVERSE.items() if r.conn is conn]
                for port in mine:
                    _REVERSE.pop(port).close()
            return b"OKAY"
        if command.startswith("killforward:"):
            port = _tcp_port(command.split(":", 1)[1])
            with _REVERSE_LOCK:
                listener = _REVERSE.get(port) if port is not None else None
                if listener is None:
                    return fail(f"listener '{command.split(':', 1)[1]}' not found")
                _REVERSE.pop(port).close()  # type: ignore[arg-type]
            return b"OKAY"
        if command.startswith("forward:"):
            rest = command[len("forward:"):]
            norebind = rest.startswith("norebind:")
            if norebind:
                rest = rest[len("norebind:"):]
            local, sep, remote = rest.partition(";")
            port = _tcp_port(local)
            if not sep or port is None or _tcp_port(remote) is None:
                return fail(f"only tcp:PORT;tcp:PORT reverse forwards are supported, got {rest!r}")
            with _REVERSE_LOCK:
                existing = _REVERSE.get(port) if port else None
                if existing is not None and not existing.closed:
                    if norebind:
                        return fail("cannot rebind existing socket")
                    existing.target = remote
                    return b"OKAY"
                try:
                    listener = ReverseListener(daemon, conn, port, remote)
                except OSError as exc:
                    return fail(f"cannot bind listener: {exc.strerror or exc}")
                _REVERSE[listener.port] = listener
            return b"OKAY" + (_protocol_string(str(listener.port)) if port == 0 else b"")
        return fail(f"unknown reverse command {command!r}")

    def run() -> None:
        with contextlib.suppress(Exception):
            stream.write(answer())
        stream.close()
    return run


# ------------------------------------------------------------------ shell / exec
class ShellService:
    """``/bin/sh -c CMD`` in the sandbox. v1/exec: one merged raw byte stream, no exit
    status. v2: stdin/stdout/stderr/exit packets. pty: a terminal (stderr merged)."""

    def __init__(self, daemon: AdbDaemon, stream: Stream, command: str, *, v2: bool, use_pty: bool,
                 term: str) -> None:
        self.daemon = daemon
        self.stream = stream
        self.command = command
        self.v2 = v2
        self.use_pty = use_pty
        self.term = term
        self.proc: subprocess.Popen[bytes] | None = None
        self._stdin_fd: int | None = None
        self._stdin_lock = threading.Lock()

    def run(self) -> None:
        try:
            self._spawn()
        except OSError as exc:
            self._fail(f"cannot start the shell: {exc}")
            return
        self.stream.on_host_close = self._hangup
        assert self.proc is not None
        outputs: list[tuple[int, int]] = []   # (fd, shell-v2 packet id)
        if self.use_pty:
            outputs.append((self._master, p.SHELL_STDOUT))
        else:
            assert self.proc.stdout is not None
            outputs.append((self.proc.stdout.fileno(), p.SHELL_STDOUT))
            if self.v2:
                assert self.proc.stderr is not None
                outputs.append((self.proc.stderr.fileno(), p.SHELL_STDERR))
        pumps = [threading.Thread(target=self._pump_output, args=(fd, pid), daemon=True) for fd, pid in outputs]
        for t in pumps:
            t.start()
        threading.Thread(target=self._pump_input, daemon=True).start()
        for t in pumps:
            t.join()
        code = self.proc.wait()
        with self.daemon.spawn_lock:
            self.daemon.spawned.discard(self.proc.pid)
        if code < 0:
            code = 128 - code   # killed by a signal: what a shell reports (137 for SIGKILL)
        if self.v2 and not self.stream.closed:
            with contextlib.suppress(Exception):
                self.stream.write(p.shell_packet(p.SHELL_EXIT, bytes([code & 0xFF])))
        self._close_stdin()
        if self.use_pty:
            with contextlib.suppress(OSError):
                os.close(self._master)
        self.stream.close()

    def _spawn(self) -> None:
        sandbox = self.daemon.sandbox
        if self.command:
            argv = ["/bin/sh", "-c", sandbox.rewrite_command(self.command)]
        else:
            argv = ["/bin/sh", "-i"]
        env = sandbox.env({"TERM": self.term})
        common = {"cwd": sandbox.command_cwd, "env": env, "start_new_session": True, "close_fds": True}
        with self.daemon.spawn_lock:
            if self.use_pty:
                self._master, slave = os.openpty()
                try:
                    self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                                 preexec_fn=_take_controlling_tty, **common)
                finally:
                    os.close(slave)
                self._stdin_fd = os.dup(self._master)
            else:
                self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE if self.v2 else subprocess.STDOUT, **common)
                assert self.proc.stdin is not None
                self._stdin_fd = self.proc.stdin.fileno()
            self.daemon.spawned.add(self.proc.pid)
            self.daemon.busy.set()

    def _fail(self, message: str) -> None:
        with contextlib.suppress(Exception):
            if self.v2:
                self.stream.write(p.shell_packet(p.SHELL_STDERR, message.encode() + b"\n")
                                  + p.shell_packet(p.SHELL_EXIT, b"\x7f"))
            else:
                self.stream.write(message.encode() + b"\n")
        self.stream.close()

    def _pump_output(self, fd: int, packet_id: int) -> None:
        limit = self.stream.conn.max_payload - (p.SHELL_HEADER.size if self.v2 else 0)
        while True:
            try:
                data = os.read(fd, limit)
            except OSError:   # EIO from a pty whose slave side closed
                data = b""
            if not data:
                return
            try:
                self.stream.write(p.shell_packet(packet_id, data) if self.v2 else data)
            except Exception:
                return  # the host went away; the process gets EPIPE / SIGHUP

    def _pump_input(self) -> None:
        reader = p.ShellPacketReader() if self.v2 else None
        while True:
            try:
                data = self.stream.read()
            except Exception:
                data = b""
            if not data:
                return
            if reader is None:
                self._write_stdin(data)
                continue
            for packet_id, payload in reader.feed(data):
                if packet_id == p.SHELL_STDIN:
                    self._write_stdin(payload)
                elif packet_id == p.SHELL_CLOSE_STDIN:
                    self._close_stdin()
                elif packet_id == p.SHELL_WINDOW_SIZE and self.use_pty:
                    _set_window_size(self._master, payload)

    def _write_stdin(self, data: bytes) -> None:
        with self._stdin_lock:
            if self._stdin_fd is None:
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._stdin_fd, view):]
            except OSError:
                pass

    def _close_stdin(self) -> None:
        with self._stdin_lock:
            if self._stdin_fd is not None:
                if self.proc is not None and self.proc.stdin is not None and not self.use_pty:
                    with contextlib.suppress(OSError):
                        self.proc.stdin.close()
                else:
                    with contextlib.suppress(OSError):
                        os.close(self._stdin_fd)
                self._stdin_fd = None

    def _hangup(self) -> None:
        """The host closed the stream: hang up on the command like a closed terminal
        (nohup'd background jobs survive, as on a phone)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGHUP)
                os.killpg(self.proc.pid, signal.SIGCONT)
        self._close_stdin()


def _take_controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_window_size(fd: int, payload: bytes) -> None:
    """Payload is "ROWSxCOLS,XPIXxYPIX" (shell_protocol.h kIdWindowSizeChange)."""
    try:
        dims, _, pixels = payload.decode().partition(",")
        rows, cols = (int(v) for v in dims.split("x"))
        xpix, ypix = (int(v) for v in pixels.split("x")) if pixels else (0, 0)
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, xpix, ypix))
    except (ValueError, OSError):
        pass


# ------------------------------------------------------------------------ sync
class _Closed(Exception):
    pass


class SyncService:
    """The file sync protocol (SYNC.TXT) over a byte stream that ignores WRTE boundaries."""

    def __init__(self, daemon: AdbDaemon, stream: Stream) -> None:
        self.daemon = daemon
        self.stream = stream
        self.sandbox = daemon.sandbox
        self._in = bytearray()
        self._out = bytearray()

    # ---- byte stream helpers
    def _read_exact(self, n: int) -> bytes:
        while len(self._in) < n:
            chunk = self.stream.read()
            if not chunk:
                raise _Closed
            self._in += chunk
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def _emit(self, data: bytes) -> None:
        """Queue reply bytes; full max_payload WRTEs go out as soon as they fill up."""
        self._out += data
        limit = self.stream.conn.max_payload
        while len(self._out) >= limit:
            chunk = bytes(self._out[:limit])
            del self._out[:limit]
            self.stream.write(chunk)

    def _flush(self) -> None:
        if self._out:
            data, self._out = bytes(self._out), bytearray()
            self.stream.write(data)

    def run(self) -> None:
        try:
            while True:
                ident, length = p.SYNC_REQUEST.unpack(self._read_exact(8))
                if ident == p.ID_QUIT:
                    break
                if ident not in (p.ID_STAT, p.ID_LIST, p.ID_SEND, p.ID_RECV):
                    self._emit(p.sync_fail(f"unknown sync command {ident!r}"))
                    break
                if length > p.SYNC_PATH_MAX:
                    self._emit(p.sync_fail(f"path too long ({length} > {p.SYNC_PATH_MAX})"))
                    break
                path = self._read_exact(length).decode("utf-8", "surrogateescape")
                if ident == p.ID_STAT:
                    self._stat(path)
                elif ident == p.ID_LIST:
                    self._list(path)
                elif ident == p.ID_SEND:
                    if not self._send(path):
                        break
                else:
                    self._recv(path)
                self._flush()
            self._flush()
        except _Closed:
            pass
        except Exception as exc:  # StreamClosed or an I/O error: just end the stream
            from .adbd import log
            log(f"sync: {exc!r}")
        self.stream.close()

    def _stat(self, path: str) -> None:
        try:
            st = os.lstat(self.sandbox.to_host(path))
            self._emit(p.sync_stat_reply(st.st_mode, st.st_size, int(st.st_mtime)))
        except (SandboxEscape, OSError):
            self._emit(p.sync_stat_reply(0, 0, 0))   # v1 STAT: all zero = "does not exist"

    def _list(self, path: str) -> None:
        try:
            directory = self.sandbox.to_host(path)
            names = [".", "..", *sorted(os.listdir(directory))]
            for name in names:
                with contextlib.suppress(OSError):
                    st = os.lstat(directory / name)
                    self._emit(p.sync_dent(st.st_mode, st.st_size, int(st.st_mtime),
                                           name.encode("utf-8", "surrogateescape")))
        except (SandboxEscape, OSError):
            pass
        self._emit(p.sync_dent_done())

    def _send(self, spec: str) -> bool:
        """SEND "path,mode" + DATA* + DONE(mtime). Written to a temp file renamed on DONE,
        so a dropped connection never leaves a partial file at the target path."""
        path, _, mode_text = spec.rpartition(",")
        error: str | None = None
        target: Path | None = None
        tmp: Path | None = None
        fd = -1
        try:
            mode = int(mode_text) if path else 0
            if not path:
                raise ValueError("SEND needs 'path,mode'")
            if stat.S_ISLNK(mode):
                raise ValueError("symlinks cannot be pushed to this virtual phone")
            target = self.sandbox.to_host(path, for_write=True)
            if target.is_dir() and not target.is_symlink():
                raise IsADirectoryError(f"{path}: is a directory")
            tmp = target.with_name(f".{target.name[:100]}.sync-{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except (SandboxEscape, ValueError, OSError) as exc:
            error = f"{exc}" if not isinstance(exc, OSError) or not exc.strerror else f"{path}: {exc.strerror}"
        try:
            while True:
                ident, value = p.SYNC_REQUEST.unpack(self._read_exact(8))
                if ident == p.ID_DATA:
                    if value > p.SYNC_DATA_MAX:
                        self._emit(p.sync_fail(f"DATA chunk of {value} bytes exceeds {p.SYNC_DATA_MAX}"))
                        return False
                    data = self._read_exact(value)
                    if fd >= 0 and error is None:
                        try:
                            view = memoryview(data)
                            while view:
                                view = view[os.write(fd, view):]
                        except OSError as exc:
                            error = f"{path}: write failed: {exc.strerror}"
                elif ident == p.ID_DONE:
                    break
                else:
                    self._emit(p.sync_fail(f"expected DATA or DONE, got {ident!r}"))
                    return False
            if error is None and fd >= 0 and tmp is not None and target is not None:
                os.fchmod(fd, stat.S_IMODE(mode) or 0o644)
                os.close(fd)
                fd = -1
                os.utime(tmp, (value, value))
                os.replace(tmp, target)
                tmp = None
                self._emit(p.sync_request(p.ID_OKAY, value=0))
            else:
                self._emit(p.sync_fail(error or "push failed"))
            return True
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _recv(self, path: str) -> None:
        try:
            source = self.sandbox.to_host(path)
            # Regular files only: a FIFO would block this stream forever, a directory cannot be sent.
            if not stat.S_ISREG(os.stat(source).st_mode):
                self._emit(p.sync_fail(f"{path}: not a regular file"))
                return
            with open(source, "rb") as f:
                while chunk := f.read(p.SYNC_DATA_MAX):
                    self._emit(p.sync_request(p.ID_DATA, chunk))
        except SandboxEscape as exc:
            self._emit(p.sync_fail(str(exc)))
            return
        except OSError as exc:
            self._emit(p.sync_fail(f"{path}: {exc.strerror or exc}"))
            return
        self._emit(p.sync_request(p.ID_DONE, value=0))
