"""`adb reverse` on a virtual phone: the `reverse:` service, adb-shell's host side (AdbDevice.reverse),
Debian's `adb reverse` (skipped without the binary), and the local backend."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vphone_support import free_port, make_key

from fedblocks.testbed.adb_backend import AdbDevice
from fedblocks.testbed.device import DeviceError
from fedblocks.testbed.keys import AdbKey, load_key
from fedblocks.testbed.local_backend import LocalDevice
from fedblocks.testbed.virtual import VirtualPhone, load_profile


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> AdbKey:
    return load_key(make_key(tmp_path_factory.mktemp("revkey")))


@pytest.fixture(scope="module")
def phone(key: AdbKey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualPhone]:
    with VirtualPhone(free_port(), load_profile("midrange"), tmp_path_factory.mktemp("revstate"),
                      [Path(f"{key.path}.pub")]) as ph:
        yield ph


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A host TCP server answering every byte upper-cased (what the phone reaches through reverse)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def _echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        sender.join()
    return bytes(got)


def _refused(port: int, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_adb_shell_reverse_carries_streams_both_ways(phone: VirtualPhone, key: AdbKey, echo_server: int) -> None:
    device = AdbDevice.connect(phone.serial, keys=[key])
    try:
        port = device.reverse(0, echo_server)
        assert port != echo_server and port > 0
        payload = bytes(range(256)) * 12000  # 3 MB: many WRTEs each way, flow-controlled
        assert _echo(port, payload) == payload.upper()
        assert _echo(port, b"second connection") == b"SECOND CONNECTION"  # one OPEN per connection
        assert device.shell("echo still here").stdout.strip() == "still here"  # the main connection is free
        device.remove_reverse(port)
        assert _refused(port)
    finally:
        device.close()


def test_a_reply_the_host_sends_just_before_closing_reaches_the_app(phone: VirtualPhone, key: AdbKey) -> None:
    """The host side answers, then closes at once (the edge server's last ACK): WRTE and CLSE
    arrive back to back. The phone's app must read the whole reply before its EOF. The virtual
    adbd once shut the app's socket on CLSE before the reply was written (a lost ACK, issue 7)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    reply = b"ACK" * 13

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = srv.accept()
            with conn:
                conn.recv(16)
                conn.sendall(reply)  # and close straight away

    rounds = 40
    server = threading.Thread(target=serve, args=(rounds,), daemon=True)
    server.start()
    device = AdbDevice.connect(phone.serial, keys=[key])
    try:
        port = device.reverse(0, srv.getsockname()[1])
        short = []
        for i in range(rounds):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"DONE")
                got = bytearray()
                while chunk := s.recv(4096):
                    got += chunk
            if bytes(got) != reply:
                short.append((i, len(got)))
        assert not short, f"(connection, bytes received of {len(reply)}): {short}"
    finally:
        device.close()
        server.join(timeout=10)
        srv.close()


def test_reverse_listeners_go_with_their_connection(phone: VirtualPhone, key: AdbKey, echo_server: int) -> None:
    device = AdbDevice.connect(phone.serial, keys=[key])
    port = device.reverse(0, echo_server)
    assert _echo(port, b"x") == b"X"
    device.close()  # closes the reverse link's connection too
    assert _refused(port)


def test_busy_device_port_is_refused_with_the_reason(phone: VirtualPhone, key: AdbKey, echo_server: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        device = AdbDevice.connect(phone.serial, keys=[key])
        try:
            with pytest.raises(DeviceError, match="adb reverse refused: cannot bind listener"):
                device.reverse(taken.getsockname()[1], echo_server)
        finally:
            device.close()


def test_local_device_needs_no_mapping(tmp_path: Path) -> None:
    local = LocalDevice(tmp_path)
    assert local.reverse(0, 7100) == 7100 and local.reverse(7100, 7100) == 7100
    with pytest.raises(DeviceError, match="cannot be moved"):
        local.reverse(7200, 7100)
    local.remove_reverse(7100)


ADB = shutil.which("adb")


@pytest.mark.skipif(ADB is None, reason="the platform-tools `adb` client is not installed")
def test_debian_adb_reverse(phone: VirtualPhone, tmp_path: Path, echo_server: int) -> None:
    assert ADB is not None
    home = tmp_path / "home"
    (home / ".android").mkdir(parents=True)
    make_key(home / ".android", "adbkey")
    server_port = free_port()
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "ANDROID_ADB_SERVER_PORT": str(server_port), "ADB_VENDOR_KEYS": ""}

    def adb(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([ADB, "-P", str(server_port), *args], env=env, capture_output=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    with VirtualPhone(free_port(), load_profile("midrange"), tmp_path / "state",
                      [home / ".android" / "adbkey.pub"]) as ph:
        try:
            assert adb("start-server").returncode == 0
            assert b"connected to" in adb("connect", ph.serial).stdout
            out = adb("-s", ph.serial, "reverse", "tcp:0", f"tcp:{echo_server}")
            assert out.returncode == 0, out.stderr
            port = int(out.stdout.strip())
            listing = adb("-s", ph.serial, "reverse", "--list").stdout.decode()
            assert f"tcp:{port} tcp:{echo_server}" in listing
            assert _echo(port, b"hello" * 100_000) == b"HELLO" * 100_000
            refused = adb("-s", ph.serial, "reverse", "--no-rebind", f"tcp:{port}", "tcp:1")
            assert refused.returncode != 0 and b"cannot rebind existing socket" in refused.stderr
            assert adb("-s", ph.serial, "reverse", "--remove", f"tcp:{port}").returncode == 0
            missing = adb("-s", ph.serial, "reverse", "--remove", f"tcp:{port}")
            assert missing.returncode != 0 and b"not found" in missing.stderr
            assert _refused(port)
        finally:
            adb("kill-server")
