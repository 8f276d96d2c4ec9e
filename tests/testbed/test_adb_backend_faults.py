"""Faults between the host and a (virtual) phone: each ends in a retry that succeeds or a
clear error in bounded time; never a hang, never a silently wrong file.

A real TCP proxy sits between AdbDevice and the virtual phone's adbd and cuts the
connection, or flips a byte inside an ADB payload (fixing the checksum, so only the
end-to-end sha256 verification can notice).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedblocks.testbed.adb_backend import AdbDevice
from fedblocks.testbed.device import DeviceConnectionError, DeviceError, TransferError, sha256_file
from fedblocks.testbed.errors import TestbedError
from fedblocks.testbed.keys import AdbKey

HEADER = struct.Struct("<6I")
WRTE = int.from_bytes(b"WRTE", "little")


class FaultProxy:
    """127.0.0.1:port -> upstream, forwarding whole ADB messages, with injectable faults.

    cut_after: close the next connection once this many bytes went host -> device
    (``cut_every`` repeats it on every connection); corrupt_to_device / corrupt_to_host:
    flip one byte in the next WRTE payload of at least 32 KiB in that direction and
    rewrite the checksum to match.
    """

    def __init__(self, upstream_port: int, port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = port
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.cut_after: int | None = None
        self.cut_every = False
        self.stall_after: int | None = None  # next connection: stop forwarding (silently) after N bytes
        self.stalls = 0
        self.corrupt_to_device = False
        self.corrupt_to_host = False
        self.connections = 0
        self.cuts = 0
        self.corruptions = 0
        self._live: list[socket.socket] = []
        self._lock = threading.Lock()
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def serial(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                self._live += [client, server]
                limit = self.cut_after
                if limit is not None and not self.cut_every:
                    self.cut_after = None
                stall, self.stall_after = self.stall_after, None
            state = {"sent": 0, "limit": limit, "stall": stall}
            threading.Thread(target=self._pump, args=(client, server, True, state), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, state), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_device: bool, state: dict) -> None:
        try:
            while True:
                header = _recv_exact(src, HEADER.size)
                cmd, arg0, arg1, length, _check, magic = HEADER.unpack(header)
                payload = _recv_exact(src, length) if length else b""
                if cmd == WRTE and length >= 32 * 1024 and self._take_corruption(to_device):
                    flipped = bytearray(payload)
                    flipped[length // 2] ^= 0x5A
                    payload = bytes(flipped)
                    header = HEADER.pack(cmd, arg0, arg1, length, sum(payload) & 0xFFFFFFFF, magic)
                message = header + payload
                if to_device and state["stall"] is not None:
                    state["sent"] += len(message)
                    if state["sent"] > state["stall"]:
                        with self._lock:
                            self.stalls += 1
                        # a wedged link: the socket stays open, nothing moves any more
                        while src.recv(65536):
                            pass
                        break
                if to_device and state["limit"] is not None:
                    room = state["limit"] - state["sent"]
                    if len(message) >= room:
                        dst.sendall(message[:max(room, 0)])
                        with self._lock:
                            self.cuts += 1
                        break
                    state["sent"] += len(message)
                dst.sendall(message)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _take_corruption(self, to_device: bool) -> bool:
        with self._lock:
            if to_device and self.corrupt_to_device:
                self.corrupt_to_device = False
            elif not to_device and self.corrupt_to_host:
                self.corrupt_to_host = False
            else:
                return False
            self.corruptions += 1
            return True

    def cut_all(self) -> None:
        with self._lock:
            live, self._live = self._live, []
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._running = False
        self.listener.close()
        self.cut_all()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return bytes(data)


@pytest.fixture
def proxy(virtual_phone: object, pick_port: Callable[[], int]) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(virtual_phone.port, pick_port())  # type: ignore[attr-defined]
    yield fault_proxy
    fault_proxy.close()


@pytest.fixture
def via_proxy(proxy: FaultProxy, adb_key: AdbKey) -> Iterator[AdbDevice]:
    device = AdbDevice.connect(proxy.serial, keys=[adb_key], auth_timeout_s=5, transport_timeout_s=5)
    yield device
    device.close()


def _blob(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(size))
    return path


def test_connection_cut_mid_push_is_retried(proxy: FaultProxy, via_proxy: AdbDevice, tmp_path: Path) -> None:
    local = _blob(tmp_path, 4_000_000)
    proxy.cut_after = 1_500_000  # the next connection dies 1.5 MB into the push
    via_proxy.close()            # ... which is the one the push opens
    remote = f"{via_proxy.base_dir}/faults/cut.bin"
    via_proxy.push(local, remote)
    assert proxy.cuts == 1
    assert via_proxy.reconnects >= 1
    assert via_proxy.sha256(remote) == sha256_file(local)
    via_proxy.remove(remote)


def test_stalled_push_times_out_and_is_retried(proxy: FaultProxy, pick_port: Callable[[], int],
                                               adb_key: AdbKey, tmp_path: Path) -> None:
    """adb-shell issue #205: a push that stops moving must not hang (here: 2 s, then a retry)."""
    device = AdbDevice.connect(proxy.serial, keys=[adb_key], transport_timeout_s=2, transfer_timeout_s=2)
    local = _blob(tmp_path, 3_000_000)
    proxy.stall_after = 1_000_000
    device.close()
    start = time.monotonic()
    device.push(local, f"{device.base_dir}/faults/stall.bin")
    assert proxy.stalls == 1 and device.reconnects >= 1
    assert time.monotonic() - start < 20
    assert device.sha256(f"{device.base_dir}/faults/stall.bin") == sha256_file(local)
    device.close()


def test_connection_cut_on_every_attempt_is_a_clear_error(proxy: FaultProxy, via_proxy: AdbDevice,
                                                          tmp_path: Path) -> None:
    local = _blob(tmp_path, 3_000_000)
    proxy.cut_after, proxy.cut_every = 1_000_000, True
    via_proxy.close()
    remote = f"{via_proxy.base_dir}/faults/never.bin"
    start = time.monotonic()
    with pytest.raises(TransferError, match="failed after 3 attempt"):
        via_proxy.push(local, remote)
    assert time.monotonic() - start < 60
    proxy.cut_after, proxy.cut_every = None, False
    assert not via_proxy.exists(remote), "a failed push must not leave the target behind"
    leftovers = via_proxy.shell(f"ls {via_proxy.base_dir}/faults 2>/dev/null | grep -c fbpart || true").stdout
    assert leftovers.strip() in ("", "0")


def test_corrupted_push_payload_is_caught_by_sha256_and_retried(proxy: FaultProxy, via_proxy: AdbDevice,
                                                                tmp_path: Path) -> None:
    local = _blob(tmp_path, 1_000_000)
    proxy.corrupt_to_device = True
    remote = f"{via_proxy.base_dir}/faults/corrupt.bin"
    via_proxy.push(local, remote)
    assert proxy.corruptions == 1, "the proxy did not corrupt anything: the test proves nothing"
    assert via_proxy.transfer_retries == 1
    assert via_proxy.sha256(remote) == sha256_file(local)


def test_corrupted_pull_payload_is_caught_and_retried(proxy: FaultProxy, via_proxy: AdbDevice,
                                                      tmp_path: Path) -> None:
    local = _blob(tmp_path, 1_000_000)
    remote = f"{via_proxy.base_dir}/faults/pull.bin"
    via_proxy.push(local, remote)
    proxy.corrupt_to_host = True
    back = tmp_path / "back.bin"
    via_proxy.pull(remote, back)
    assert proxy.corruptions == 1
    assert back.read_bytes() == local.read_bytes()
    assert via_proxy.transfer_retries == 1


def test_connection_cut_mid_job_job_survives_and_poll_reconnects(proxy: FaultProxy, via_proxy: AdbDevice) -> None:
    workdir = f"{via_proxy.base_dir}/faults"
    handle = via_proxy.start_job("echo begin; sleep 2; echo end", workdir)
    proxy.cut_all()
    status = via_proxy.poll_job(handle)  # reconnects transparently: polling is idempotent
    assert status.running
    assert via_proxy.reconnects == 1
    final = via_proxy.wait_job(handle, timeout_s=20, poll_s=0.2)
    assert final.state == "exited" and final.exit_code == 0
    assert final.log_tail.split() == ["begin", "end"]


def test_non_idempotent_shell_is_not_repeated_after_a_drop(proxy: FaultProxy, via_proxy: AdbDevice) -> None:
    marker = f"{via_proxy.base_dir}/faults/count"
    via_proxy.shell(["rm", "-f", marker])

    def cut_soon() -> None:
        time.sleep(0.5)
        proxy.cut_all()

    threading.Thread(target=cut_soon, daemon=True).start()
    with pytest.raises(DeviceConnectionError, match="not repeated") as info:
        via_proxy.shell(f"echo x >> {marker}; sleep 3")
    assert info.value.reconnected
    time.sleep(0.2)
    assert via_proxy.shell(["cat", marker]).stdout == "x\n", "the command ran more than once"


def test_adbd_killed_is_a_clear_error_in_bounded_time(phone_factory: object, adb_key: AdbKey,
                                                      tmp_path: Path) -> None:
    phone = phone_factory()  # type: ignore[operator]
    device = AdbDevice.connect(phone.serial, keys=[adb_key], auth_timeout_s=5, transport_timeout_s=5)
    assert device.shell("echo up").stdout == "up\n"
    phone.kill_adbd()
    start = time.monotonic()
    with pytest.raises(DeviceConnectionError, match="cannot connect") as info:
        device.shell("echo down?")
    assert not info.value.reconnected
    with pytest.raises(DeviceError, match="cannot connect"):
        device.push(_blob(tmp_path, 10_000), f"{device.base_dir}/x")
    assert time.monotonic() - start < 15
    device.close()


def test_unreachable_port_is_a_clear_error(adb_key: AdbKey, pick_port: Callable[[], int]) -> None:
    start = time.monotonic()
    with pytest.raises(DeviceConnectionError, match=r"cannot connect to 127\.0\.0\.1"):
        AdbDevice.connect(f"127.0.0.1:{pick_port()}", keys=[adb_key], auth_timeout_s=1, transport_timeout_s=2)
    assert time.monotonic() - start < 5


def test_refused_key_is_a_testbed_error(virtual_phone: object, stranger_key: AdbKey) -> None:
    notices: list[str] = []
    start = time.monotonic()
    with pytest.raises(TestbedError, match="did not accept this host's adb key") as info:
        AdbDevice.connect(virtual_phone.serial, keys=[stranger_key], auth_timeout_s=3,  # type: ignore[attr-defined]
                          notify=notices.append)
    assert not isinstance(info.value, DeviceConnectionError)
    assert time.monotonic() - start < 10
    assert notices and "waiting for 'Allow USB debugging?' on" in notices[0] and "timeout 3s" in notices[0]


def test_usb_serial_without_usb_extra(adb_key: AdbKey) -> None:
    pytest.importorskip("adb_shell")
    try:
        import usb1  # noqa: F401
    except ImportError:
        with pytest.raises(TestbedError, match=r"pip install 'fedblocks\[usb\]'"):
            AdbDevice.connect("0123456789ABCDEF", keys=[adb_key])
    else:
        pytest.skip("libusb1 is installed: this host takes the USB path")


def test_shell_v1_fallback_exit_codes(virtual_phone: object, adb_key: AdbKey) -> None:
    device = AdbDevice.connect(virtual_phone.serial, keys=[adb_key])  # type: ignore[attr-defined]
    device.features = frozenset()  # as on a device without shell_v2 (Android < 7)
    res = device.shell("echo out; echo err >&2; exit 4")
    assert res.exit_code == 4 and res.stderr_merged
    assert sorted(res.stdout.split()) == ["err", "out"]
    assert device.shell(["printf", "%s", "no newline"]).stdout == "no newline"
    assert device.shell("exit 0").exit_code == 0
    device.close()


def test_fast_checksum_matches_adb_shells() -> None:
    import adb_shell.adb_device
    import adb_shell.adb_message

    from fedblocks.testbed.adb import protocol

    def reference(data: bytes | bytearray) -> int:  # adb-shell 0.4.4's own definition
        return sum(data) & 0xFFFFFFFF

    assert adb_shell.adb_message.checksum is protocol.checksum
    assert adb_shell.adb_device.checksum is protocol.checksum
    for size in (0, 1, 4095, 4096, 65536, 1 << 20, (1 << 20) + 3):
        data = os.urandom(size)
        assert protocol.checksum(data) == reference(data)
        assert protocol.checksum(bytearray(data)) == reference(data)
    big = b"\xff" * (17 << 20)  # sum exceeds 2**32: wraps like the reference
    assert protocol.checksum(big) == reference(big)
