"""AdbDevice: the Device contract over adb-shell, for real phones (TCP or USB) and virtual ones.

Serial forms: ``HOST:PORT`` is TCP (wireless debugging, ``adb tcpip 5555``, a virtual
phone); ``emulator-N`` is the emulator's adbd on 127.0.0.1:N+1; anything else is a USB
serial (needs the ``usb`` extra).

What this adds to adb-shell 0.4.4:
- a TCP transport that reports a closed socket at once (adb-shell's spins until its
  read timeout) and writes with ``sendall`` (adb-shell's ``send`` on a non-blocking
  socket can write part of a 1 MiB packet and desynchronise the stream);
- ``shell,v2,raw:`` when the device advertises ``shell_v2``: separate stderr and the
  real exit status; otherwise v1 ``shell:`` with an exit-status marker;
- a refused service (CLSE answering OPEN) is an error at once, not a read timeout;
- every operation runs under a deadline; a dropped connection is re-established once
  and idempotent operations are retried; a timeout resets the connection so no stale
  packet of the abandoned stream can confuse the next command.
"""

from __future__ import annotations

import secrets
import shlex
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from adb_shell import constants as adbc
from adb_shell import exceptions as adbx
from adb_shell.adb_device import AdbDevice as _AdbClient
from adb_shell.adb_message import AdbMessage
from adb_shell.hidden_helpers import _AdbTransactionInfo
from adb_shell.transport.base_transport import BaseTransport

from .adb import protocol
from .device import (
    Device,
    DeviceConnectionError,
    DeviceError,
    DeviceTimeout,
    DirEntry,
    ShellResult,
    TransferError,
    TransferProgress,
)
from .errors import TestbedError
from .keys import AdbKey, default_key, public_key_line

DEFAULT_BASE_DIR = "/data/local/tmp/fedblocks"
USB_EXTRA_HINT = "USB needs the usb extra: pip install 'fedblocks[usb]'"

# adb-shell / socket failures that mean "the connection is no longer usable"
_CONNECTION_FAILURES: tuple[type[BaseException], ...] = (
    adbx.AdbConnectionError,
    adbx.TcpTimeoutException,
    adbx.AdbTimeoutError,
    adbx.InvalidChecksumError,
    adbx.InvalidCommandError,
    adbx.InvalidResponseError,
    adbx.UsbReadFailedError,
    adbx.UsbWriteFailedError,
    OSError,
    struct.error,
    KeyError,  # adb-shell's FILESYNC_WIRE_TO_ID lookup on a desynchronised stream
)

_T = TypeVar("_T")


def _install_fast_checksum() -> None:
    """adb-shell sums every payload byte in pure Python (~50 MB/s, holding the GIL: the
    bottleneck when one host feeds 16 phones); the shared wire code computes the same
    sum mod 2**32 with numpy (~1 GB/s). Same values (tests/testbed/test_adb_backend_faults.py)."""
    import adb_shell.adb_device as adb_device_module
    import adb_shell.adb_message as adb_message_module

    adb_message_module.checksum = protocol.checksum  # used by AdbMessage.pack (sending)
    adb_device_module.checksum = protocol.checksum   # used to verify what the device sends


_install_fast_checksum()


class _TcpTransport(BaseTransport):
    """Blocking socket with per-call timeouts; EOF is an error, writes are complete."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._sock: socket.socket | None = None

    def connect(self, transport_timeout_s: float | None) -> None:
        self.close()
        sock = socket.create_connection((self.host, self.port), timeout=transport_timeout_s or 10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a peer that vanishes without a FIN/RST (phone off Wi-Fi) is noticed in ~1 min
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        self._sock = sock

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise adbx.AdbConnectionError(f"not connected to {self.host}:{self.port}")
        return self._sock

    def bulk_read(self, numbytes: int, transport_timeout_s: float | None) -> bytes:
        sock = self._socket()
        sock.settimeout(transport_timeout_s)
        try:
            data = sock.recv(numbytes)
        except TimeoutError:
            raise adbx.TcpTimeoutException(
                f"no data from {self.host}:{self.port} within {transport_timeout_s} s") from None
        if not data:
            raise adbx.AdbConnectionError(f"{self.host}:{self.port} closed the connection")
        return data

    def bulk_write(self, data: bytes, transport_timeout_s: float | None) -> int:
        sock = self._socket()
        sock.settimeout(transport_timeout_s)
        try:
            sock.sendall(data)
        except TimeoutError:
            raise adbx.TcpTimeoutException(
                f"could not send to {self.host}:{self.port} within {transport_timeout_s} s") from None
        return len(data)


def parse_tcp_serial(serial: str) -> tuple[str, int] | None:
    """``host:port`` / ``[v6]:port`` / ``emulator-N`` -> (host, port); None for a USB serial."""
    if serial.startswith("emulator-") and serial[9:].isdigit():
        return "127.0.0.1", int(serial[9:]) + 1
    host, sep, port = serial.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    if not 0 < int(port) < 65536:
        raise TestbedError(f"serial {serial!r}: port {port} is out of range")
    return host.strip("[]"), int(port)


def _print_notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class AdbDevice(Device):
    """A phone reached over the ADB protocol (adb-shell), with verified transfers."""

    def __init__(
        self,
        serial: str,
        *,
        keys: Sequence[AdbKey] | None = None,
        auth_timeout_s: float = 60.0,
        transport_timeout_s: float = 10.0,
        transfer_timeout_s: float = 60.0,
        base_dir: str = DEFAULT_BASE_DIR,
        notify: Callable[[str], None] = _print_notice,
    ) -> None:
        self.serial = serial
        self.base_dir = base_dir.rstrip("/") or "/"
        self.keys = list(keys) if keys is not None else [default_key()]
        if not self.keys:
            raise TestbedError("AdbDevice needs at least one adb key")
        self.auth_timeout_s = auth_timeout_s
        self.transport_timeout_s = transport_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.notify = notify
        self.banner_props: dict[str, str] = {}
        self.features: frozenset[str] = frozenset()
        self.reconnects = 0
        self._tcp = parse_tcp_serial(serial)
        self._client: _AdbClient | None = None
        self._lock = threading.RLock()
        self._reverse_links: dict[int, _ReverseLink] = {}

    @classmethod
    def connect(cls, serial: str, keys: Sequence[AdbKey] | None = None, auth_timeout_s: float = 60.0,
                **kwargs: Any) -> AdbDevice:
        """Open (and authenticate) a connection; TestbedError says what to fix when it fails."""
        device = cls(serial, keys=keys, auth_timeout_s=auth_timeout_s, **kwargs)
        with device._lock:
            device._ensure_connected()
        return device

    # ----- connection ---------------------------------------------------------------------------
    def _new_client(self) -> _AdbClient:
        if self._tcp is not None:
            host, port = self._tcp
            return _AdbClient(_TcpTransport(host, port), default_transport_timeout_s=self.transport_timeout_s)
        from adb_shell.adb_device import AdbDeviceUsb, UsbTransport

        if UsbTransport is None:
            raise TestbedError(f"{self.serial} looks like a USB serial. {USB_EXTRA_HINT}")
        try:
            return AdbDeviceUsb(serial=self.serial, default_transport_timeout_s=self.transport_timeout_s)
        except adbx.UsbDeviceNotFoundError:
            raise DeviceConnectionError(
                f"USB device {self.serial} not found or busy: check the cable and `lsusb`; if the "
                "platform-tools adb server holds it, run `adb kill-server` (or use wireless adb)") from None
        except adbx.InvalidTransportError:
            raise TestbedError(f"{self.serial} looks like a USB serial. {USB_EXTRA_HINT}") from None
        except Exception as exc:  # libusb errors (access denied, busy) come as usb1's own types
            raise DeviceConnectionError(
                f"cannot open USB device {self.serial}: {exc}; check udev permissions (plugdev group) "
                "and that no other adb server holds it (`adb kill-server`)") from None

    def _ensure_connected(self) -> _AdbClient:
        if self._client is not None:
            return self._client
        client = self._new_client()
        banner: list[bytes] = []
        io = client._io_manager
        original_read = io._read_expected_packet_from_device

        def capture_banner(expected: list[bytes], info: _AdbTransactionInfo) -> tuple[Any, ...]:
            packet = original_read(expected, info)
            if packet[0] == adbc.CNXN:
                banner.append(bytes(packet[3]))
            return packet

        io._read_expected_packet_from_device = capture_banner  # type: ignore[method-assign]
        prompted: list[bool] = []

        def on_auth_prompt(_: object) -> None:
            prompted.append(True)
            self.notify(f"waiting for 'Allow USB debugging?' on {self.serial}: accept it on the phone "
                        f"(timeout {self.auth_timeout_s:g}s)")

        try:
            client.connect(
                rsa_keys=[key.signer() for key in self.keys],
                transport_timeout_s=self.transport_timeout_s,
                auth_timeout_s=self.auth_timeout_s,
                read_timeout_s=max(self.transport_timeout_s, 1.0),
                auth_callback=on_auth_prompt,
            )
        except (ConnectionRefusedError, socket.gaierror, TimeoutError) as exc:
            client.close()
            raise DeviceConnectionError(self._unreachable_message(exc)) from None
        except _CONNECTION_FAILURES as exc:
            client.close()
            if prompted:
                raise TestbedError(
                    f"{self.serial} did not accept this host's adb key within {self.auth_timeout_s:g} s "
                    f"(refused or not answered): on the phone tap 'Allow' on 'Allow USB debugging?' "
                    f"(tick 'Always allow'); for a virtual phone add {self.keys[0].path}.pub to its "
                    f"authorized keys. Key: {public_key_line(self.keys[0])[:40]}..."
                ) from None
            raise DeviceConnectionError(self._unreachable_message(exc)) from None
        if banner:
            parsed = protocol.parse_banner(banner[-1])
            self.banner_props, self.features = parsed.properties, frozenset(parsed.features)
        self._client = client
        return client

    def _unreachable_message(self, exc: BaseException) -> str:
        hint = ("is the phone on the network with wireless debugging on (`adb tcpip 5555` or Developer "
                "options > Wireless debugging), or the virtual phone running?"
                if self._tcp else "is the phone plugged in with USB debugging on?")
        return f"cannot connect to {self.serial}: {exc or type(exc).__name__}; {hint}"

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken transport may fail in any way; it is gone either way
                pass

    def close(self) -> None:
        with self._lock:
            links, self._reverse_links = dict(self._reverse_links), {}
            self._drop()
        for link in links.values():
            link.close()

    # ----- adb reverse --------------------------------------------------------------------------
    def reverse(self, device_port: int, host_port: int) -> int:
        """``adb reverse tcp:D tcp:H`` without an adb server: a dedicated ADB connection asks the
        device for the listener and then carries its streams (see _ReverseLink)."""
        link = _ReverseLink(self, device_port, host_port)
        self._reverse_links[link.device_port] = link
        return link.device_port

    def remove_reverse(self, device_port: int) -> None:
        link = self._reverse_links.pop(device_port, None)
        if link is not None:
            link.close()  # adbd drops a reverse listener with the connection that made it

    def _run(self, what: str, op: Callable[[_AdbClient], _T], *, idempotent: bool) -> _T:
        """Run ``op`` on a live connection; a dropped connection is re-established once and
        the op retried if idempotent. Never returns a result from a desynchronised stream."""
        with self._lock:
            for attempt in (1, 2):
                client = self._ensure_connected()
                try:
                    return op(client)
                except DeviceTimeout:
                    self._drop()  # the abandoned stream may still deliver packets
                    raise
                except (adbx.AdbCommandFailureException, adbx.PushFailedError) as exc:
                    raise DeviceError(f"{self.serial}: {what}: {_describe(exc)}") from None
                except _CONNECTION_FAILURES as exc:
                    self._drop()
                    reason = _describe(exc)
                    try:
                        self._ensure_connected()
                    except DeviceConnectionError as again:
                        raise DeviceConnectionError(
                            f"{self.serial}: connection lost during {what} ({reason}) and reconnecting "
                            f"failed: {again}") from None
                    self.reconnects += 1
                    if not idempotent:
                        raise DeviceConnectionError(
                            f"{self.serial}: connection lost during {what} ({reason}); reconnected, but "
                            f"the command was not repeated because it may have run", reconnected=True) from None
                    if attempt == 2:
                        raise DeviceConnectionError(
                            f"{self.serial}: connection lost twice during {what} ({reason})",
                            reconnected=True) from None
            raise AssertionError("unreachable")

    # ----- streams ------------------------------------------------------------------------------
    def _open(self, client: _AdbClient, destination: bytes, timeout_s: float) -> _AdbTransactionInfo:
        """OPEN a stream; a refusal (CLSE) is an error now, not after a read timeout."""
        with client._local_id_lock:
            client._local_id = client._local_id % (2**32 - 1) + 1
            local_id = client._local_id
        info = _AdbTransactionInfo(local_id, None, timeout_s, timeout_s, None)
        client._io_manager.send(AdbMessage(adbc.OPEN, local_id, 0, destination + b"\0"), info)
        cmd, remote_id, _, _ = client._io_manager.read([adbc.OKAY, adbc.CLSE], info)
        if cmd == adbc.CLSE:
            raise DeviceError(f"{self.serial}: the device refused service {destination[:60]!r}")
        info.remote_id = remote_id
        return info

    def _stream_until_close(self, client: _AdbClient, destination: bytes, timeout_s: float | None,
                            on_data: Callable[[bytes], None]) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        info = self._open(client, destination, self._left(deadline))
        while True:
            left = self._left(deadline)
            info.read_timeout_s = info.transport_timeout_s = left
            try:
                cmd, data = client._read_until([adbc.CLSE, adbc.WRTE], info)
            except (adbx.TcpTimeoutException, adbx.AdbTimeoutError):
                if deadline is not None and time.monotonic() >= deadline - 0.01:
                    raise DeviceTimeout(
                        f"{self.serial}: command did not finish within {timeout_s:g} s: "
                        f"{destination[:120].decode('utf-8', 'replace')!r}") from None
                raise
            if cmd == adbc.CLSE:
                client._io_manager.send(AdbMessage(adbc.CLSE, info.local_id, info.remote_id), info)
                return
            on_data(data)

    def _left(self, deadline: float | None) -> float:
        if deadline is None:
            return 3600.0  # "no limit": keepalive still notices a vanished peer
        return max(0.05, deadline - time.monotonic())

    # ----- Device backend methods ------------------------------------------------------------------
    def _shell(self, command: str, timeout_s: float | None, idempotent: bool) -> ShellResult:
        def run(client: _AdbClient) -> ShellResult:
            if "shell_v2" in self.features:
                return self._shell_v2(client, command, timeout_s)
            return self._shell_v1(client, command, timeout_s)

        return self._run(f"shell {command[:60]!r}", run, idempotent=idempotent)

    def _shell_v2(self, client: _AdbClient, command: str, timeout_s: float | None) -> ShellResult:
        reader = protocol.ShellPacketReader()
        out = bytearray()
        err = bytearray()
        exit_code: list[int] = []

        def on_data(data: bytes) -> None:
            for kind, payload in reader.feed(data):
                if kind == protocol.SHELL_STDOUT:
                    out.extend(payload)
                elif kind == protocol.SHELL_STDERR:
                    err.extend(payload)
                elif kind == protocol.SHELL_EXIT and payload:
                    exit_code.append(payload[0])

        self._stream_until_close(client, b"shell,v2,raw:" + command.encode("utf-8"), timeout_s, on_data)
        if not exit_code:
            raise adbx.AdbConnectionError("shell stream closed without an exit status")
        return ShellResult(_decode(out), _decode(err), exit_code[-1])

    def _shell_v1(self, client: _AdbClient, command: str, timeout_s: float | None) -> ShellResult:
        marker = f"__FEDBLOCKS_RC_{secrets.token_hex(6)}="
        # the user's command runs in its own sh so `exit` cannot skip the marker
        wrapped = f"sh -c {shlex.quote(command)} < /dev/null; printf '\\n{marker}%s\\n' \"$?\""
        out = bytearray()
        self._stream_until_close(client, b"shell:" + wrapped.encode("utf-8"), timeout_s, out.extend)
        text = _decode(out).replace("\r\n", "\n")  # v1 runs in a pty on real phones
        head, sep, tail = text.rpartition("\n" + marker)
        code = tail.strip()
        if not sep or not code.isdigit():
            raise adbx.AdbConnectionError("shell output ended before the exit-status marker")
        return ShellResult(head, "", int(code), stderr_merged=True)

    def _push_raw(self, local: Path, remote: str, progress: TransferProgress) -> None:
        mode = stat.S_IFREG | (local.stat().st_mode & 0o777)

        def run(client: _AdbClient) -> None:
            progress.reset()
            client.push(str(local), remote, st_mode=mode, progress_callback=lambda _p, n, _t: progress.advance(n),
                        transport_timeout_s=self.transfer_timeout_s, read_timeout_s=self.transfer_timeout_s)

        try:
            self._run(f"push to {remote!r}", run, idempotent=True)  # a temp name: safe to repeat
        except DeviceError as exc:
            if isinstance(exc, DeviceConnectionError | DeviceTimeout):
                raise
            raise TransferError(str(exc)) from None

    def _pull_raw(self, remote: str, local: Path, progress: TransferProgress) -> None:
        def run(client: _AdbClient) -> None:
            progress.reset()
            client.pull(remote, str(local), progress_callback=lambda _p, n, _t: progress.advance(n),
                        transport_timeout_s=self.transfer_timeout_s, read_timeout_s=self.transfer_timeout_s)

        self._run(f"pull {remote!r}", run, idempotent=True)

    def _list_raw(self, remote: str) -> list[DirEntry]:
        def run(client: _AdbClient) -> list[DirEntry]:
            return [DirEntry(_decode(f.filename), _mode_kind(f.mode), int(f.size))
                    for f in client.list(remote, transport_timeout_s=self.transfer_timeout_s,
                                         read_timeout_s=self.transfer_timeout_s)]

        if self.size(remote) is not None or not self.exists(remote):
            # sync LIST answers an empty listing for a missing path or a file: say so instead
            raise DeviceError(f"{self.serial}: cannot list {remote!r}: not a directory")
        return self._run(f"list {remote!r}", run, idempotent=True)


def _mode_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "other"


def _decode(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", "backslashreplace")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, adbx.PushFailedError | adbx.AdbCommandFailureException) and exc.args:
        arg = exc.args[0]
        if isinstance(arg, bytes | bytearray):
            text = bytes(arg).decode("utf-8", "replace")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _ReverseLink:
    """One `adb reverse` mapping: the host half of adb's reverse forwarding, on its own connection.

    adb-shell does the CNXN/AUTH handshake of a second connection to the device; then this
    speaks the transport protocol itself (testbed/adb/protocol.py): it OPENs
    ``reverse:forward:tcp:D;tcp:H`` (adbd answers "OKAY", plus the port when D was 0, or
    "FAIL" + reason), and a pump thread serves the device's OPEN "tcp:H" requests (one per
    connection an app makes to the device port) by connecting to 127.0.0.1:H and copying
    WRTE payloads both ways, one WRTE in flight per direction. The device may open nothing
    but the mapped host port. Closing the connection removes the device's listener.
    """

    def __init__(self, device: AdbDevice, device_port: int, host_port: int) -> None:
        if not (0 <= device_port <= 65535 and 1 <= host_port <= 65535):
            raise DeviceError(f"{device.serial}: reverse needs TCP ports, got {device_port} -> {host_port}")
        self.serial = device.serial
        self.host_port = host_port
        self._target = f"tcp:{host_port}".encode()
        self._conn = AdbDevice.connect(device.serial, keys=device.keys, auth_timeout_s=device.auth_timeout_s,
                                       transport_timeout_s=device.transport_timeout_s, notify=device.notify)
        client = self._conn._client
        assert client is not None
        self._transport = client._io_manager._transport
        self._max_payload = max(4096, min(int(getattr(client, "_maxdata", 4096)), protocol.MAX_PAYLOAD))
        self._send_lock = threading.Lock()
        self._channels: dict[int, _ReverseChannel] = {}
        self._next_id = 1
        self._closed = False
        try:
            self.device_port = self._request(f"reverse:forward:tcp:{device_port};tcp:{host_port}", device_port)
        except BaseException:
            self._conn.close()
            raise
        self._pump = threading.Thread(target=self._run, name=f"adb-reverse-{self.device_port}", daemon=True)
        self._pump.start()

    # -- raw transport
    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        with self._send_lock:
            self._transport.bulk_write(protocol.pack_message(command, arg0, arg1, data), 30.0)

    def _read_exact(self, n: int, timeout_s: float | None) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            buf += self._transport.bulk_read(n - len(buf), timeout_s)
        return bytes(buf)

    def _recv(self, timeout_s: float | None) -> protocol.Message:
        header = protocol.unpack_header(self._read_exact(protocol.HEADER_SIZE, timeout_s))
        data = self._read_exact(header.data_length, 30.0) if header.data_length else b""
        return protocol.Message(header.command, header.arg0, header.arg1, data)

    def _request(self, service: str, device_port: int) -> int:
        """OPEN the reverse service, read its whole reply, return the device port."""
        local = 0x7FFF0000
        self.send(protocol.A_OPEN, local, 0, service.encode() + b"\0")
        reply = b""
        deadline = time.monotonic() + 30.0
        while True:
            msg = self._recv(max(0.1, deadline - time.monotonic()))
            if msg.arg1 != local:
                continue  # nothing else is open on this connection yet
            if msg.command == protocol.A_WRTE:
                reply += msg.data
                self.send(protocol.A_OKAY, local, msg.arg0)
            elif msg.command == protocol.A_CLSE:
                break
        if reply.startswith(b"FAIL"):
            raise DeviceError(f"{self.serial}: adb reverse refused: {reply[8:].decode('utf-8', 'replace')}")
        if not reply.startswith(b"OKAY"):
            raise DeviceError(f"{self.serial}: unexpected answer to {service!r}: {reply[:40]!r}")
        if device_port == 0:
            try:
                return int(reply[8:8 + int(reply[4:8], 16)])
            except ValueError:
                raise DeviceError(f"{self.serial}: adb reverse did not say which port it chose: {reply!r}") from None
        return device_port

    # -- the pump
    def _run(self) -> None:
        try:
            while not self._closed:
                try:
                    msg = self._recv(3600.0)
                except (adbx.TcpTimeoutException, adbx.AdbTimeoutError):
                    continue
                self._handle(msg)
        except (*_CONNECTION_FAILURES, protocol.ProtocolError):
            pass  # the connection is gone, and with it the device's listener
        finally:
            for channel in list(self._channels.values()):
                channel.close()

    def _handle(self, msg: protocol.Message) -> None:
        if msg.command == protocol.A_OPEN:
            if msg.data.split(b"\0", 1)[0] != self._target:
                self.send(protocol.A_CLSE, 0, msg.arg0)  # the device may reach only the mapped port
                return
            try:
                sock = socket.create_connection(("127.0.0.1", self.host_port), timeout=10)
            except OSError:
                self.send(protocol.A_CLSE, 0, msg.arg0)
                return
            local, self._next_id = self._next_id, self._next_id % 0x7FFEFFFF + 1
            channel = _ReverseChannel(self, local, msg.arg0, sock)
            self._channels[local] = channel
            self.send(protocol.A_OKAY, local, msg.arg0)
            channel.start()
            return
        channel = self._channels.get(msg.arg1)
        if channel is None:
            return
        if msg.command == protocol.A_WRTE:
            channel.deliver(msg.data)
        elif msg.command == protocol.A_OKAY:
            channel.okayed()
        elif msg.command == protocol.A_CLSE:
            self._channels.pop(msg.arg1, None)
            channel.close(notify=False)

    def forget(self, local: int) -> None:
        self._channels.pop(local, None)

    def close(self) -> None:
        self._closed = True
        self._conn.close()


class _ReverseChannel:
    """One device-initiated stream bridged to a host socket."""

    def __init__(self, link: _ReverseLink, local: int, remote: int, sock: socket.socket) -> None:
        self.link, self.local, self.remote, self.sock = link, local, remote, sock
        self._may_write = threading.Event()
        self._may_write.set()
        self._closed = False

    def start(self) -> None:
        threading.Thread(target=self._host_to_device, daemon=True).start()

    def deliver(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.close()
            return
        self.link.send(protocol.A_OKAY, self.local, self.remote)

    def okayed(self) -> None:
        self._may_write.set()

    def _host_to_device(self) -> None:
        self.sock.settimeout(None)
        try:
            while not self._closed:
                data = self.sock.recv(self.link._max_payload)
                if not data:
                    break
                while not self._may_write.wait(1.0):
                    if self._closed:
                        return
                self._may_write.clear()
                self.link.send(protocol.A_WRTE, self.local, self.remote, data)
        except (OSError, *_CONNECTION_FAILURES):
            pass
        self.close()

    def close(self, notify: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._may_write.set()
        self.link.forget(self.local)
        if notify:
            try:
                self.link.send(protocol.A_CLSE, self.local, self.remote)
            except (OSError, *_CONNECTION_FAILURES):
                pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
