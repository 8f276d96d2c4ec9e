"""Shared helpers for the virtual-phone tests: free ports, test keys, a raw ADB client.

The raw client speaks the transport protocol directly (via fedblocks.testbed.adb.protocol)
so tests can do what adb and adb-shell never do on purpose: open streams before auth,
drop a connection in the middle of a push, split packets at odd boundaries.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from adb_shell.adb_device import AdbDeviceTcp
from adb_shell.auth.keygen import keygen
from adb_shell.auth.sign_pythonrsa import PythonRSASigner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fedblocks.testbed.adb import protocol as p


def free_port() -> int:
    """A currently free TCP port (the kernel's ephemeral range, far from 5555-5585)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_key(directory: Path, name: str = "adbkey") -> Path:
    path = directory / name
    keygen(str(path))
    return path


def adb_shell_device(port: int, key: Path, timeout: float = 10.0) -> AdbDeviceTcp:
    device = AdbDeviceTcp("127.0.0.1", port, default_transport_timeout_s=timeout)
    device.connect(rsa_keys=[PythonRSASigner.FromRSAKeyPath(str(key))], auth_timeout_s=min(3.0, timeout),
                   read_timeout_s=timeout)
    return device


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


class RawClient:
    """A minimal host: CNXN, AUTH by signature, streams with explicit control."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.next_id = 100

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        self.sock.sendall(p.pack_message(command, arg0, arg1, data))

    def _recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("device closed the connection")
            data += chunk
        return bytes(data)

    def recv(self) -> p.Message:
        header = p.unpack_header(self._recv_exact(p.HEADER_SIZE))
        data = self._recv_exact(header.data_length) if header.data_length else b""
        assert p.checksum(data) == header.data_check, "device must send correct checksums"
        return p.Message(header.command, header.arg0, header.arg1, data)

    def connect(self, key: rsa.RSAPrivateKey | None) -> p.Message:
        """Returns the device's CNXN (or raises if refused)."""
        self.send(p.A_CNXN, p.A_VERSION, p.MAX_PAYLOAD, b"host::features=shell_v2\0")
        msg = self.recv()
        assert msg.command == p.A_AUTH and msg.arg0 == p.AUTH_TOKEN and len(msg.data) == p.TOKEN_SIZE
        if key is None:
            return msg
        self.send(p.A_AUTH, p.AUTH_SIGNATURE, 0, p.sign_token(key, msg.data))
        msg = self.recv()
        if msg.command != p.A_CNXN:
            raise PermissionError(f"device answered {msg.name}, not CNXN")
        return msg

    def open(self, service: bytes) -> tuple[int, int]:
        self.next_id += 1
        local = self.next_id
        self.send(p.A_OPEN, local, 0, service + b"\0")
        msg = self.recv()
        if msg.command != p.A_OKAY:
            raise ConnectionRefusedError(f"OPEN {service!r} answered with {msg.name}")
        assert msg.arg1 == local
        return local, msg.arg0

    def write(self, local: int, remote: int, data: bytes) -> None:
        """WRTE and wait for its OKAY (replies must not arrive before it)."""
        self.send(p.A_WRTE, local, remote, data)
        msg = self.recv()
        assert msg.command == p.A_OKAY, f"expected OKAY for our WRTE, got {msg.name}"
        assert (msg.arg0, msg.arg1) == (remote, local)

    def write_collecting(self, local: int, remote: int, data: bytes, sink: bytearray) -> None:
        """WRTE, then wait for its OKAY while acknowledging (and keeping) device output
        that an interactive service may send meanwhile."""
        self.send(p.A_WRTE, local, remote, data)
        while True:
            msg = self.recv()
            if msg.command == p.A_OKAY:
                return
            assert msg.command == p.A_WRTE, msg.name
            sink += msg.data
            self.send(p.A_OKAY, local, remote)

    def read_until_close(self, local: int, remote: int, out: bytearray | None = None) -> bytes:
        out = bytearray() if out is None else out
        while True:
            msg = self.recv()
            if msg.command == p.A_WRTE:
                out += msg.data
                self.send(p.A_OKAY, local, remote)
            elif msg.command == p.A_CLSE:
                self.send(p.A_CLSE, local, remote)
                return bytes(out)

    def close(self) -> None:
        self.sock.close()


def parse_shell_v2(data: bytes) -> tuple[bytes, bytes, int | None]:
    reader = p.ShellPacketReader()
    out, err, code = b"", b"", None
    for packet_id, payload in reader.feed(data):
        if packet_id == p.SHELL_STDOUT:
            out += payload
        elif packet_id == p.SHELL_STDERR:
            err += payload
        elif packet_id == p.SHELL_EXIT:
            code = payload[0]
    return out, err, code


def sync_send_request(path: str, mode: int = 0o100644) -> bytes:
    return p.sync_request(p.ID_SEND, f"{path},{mode}".encode())


def sync_data(chunk: bytes) -> bytes:
    return p.sync_request(p.ID_DATA, chunk)


def sync_done(mtime: int = 1_700_000_000) -> bytes:
    return p.sync_request(p.ID_DONE, value=mtime)


def sync_status(data: bytes) -> tuple[bytes, bytes]:
    ident, length = struct.unpack("<4sI", data[:8])
    return ident, data[8:8 + length] if ident == p.ID_FAIL else b""
