"""The stock platform-tools client (Debian's adb 29) against a virtual phone.

Each test module runs its own adb server on a free port with HOME pointing at a temp
dir, so the server signs with a test key and never touches the user's adb server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from vphone_support import free_port, make_key

from fedblocks.testbed.virtual import VirtualPhone, load_profile

ADB = shutil.which("adb")
pytestmark = pytest.mark.skipif(ADB is None, reason="the platform-tools `adb` client is not installed")


@dataclass
class AdbServer:
    port: int
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[bytes]:
        assert ADB is not None
        result = subprocess.run([ADB, "-P", str(self.port), *args], env=self.env, capture_output=True,
                                stdin=subprocess.DEVNULL, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"adb {' '.join(args)} -> {result.returncode}: {result.stderr.decode()}")
        return result


@pytest.fixture(scope="module")
def adb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdbServer]:
    home = tmp_path_factory.mktemp("adbhome")
    (home / ".android").mkdir()
    make_key(home / ".android", "adbkey")   # adb 29 reads the PEM key and its .pub
    port = free_port()
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "ANDROID_ADB_SERVER_PORT": str(port), "ADB_VENDOR_KEYS": ""}
    server = AdbServer(port, env)
    server("start-server", check=True)
    yield server
    server("kill-server")


@pytest.fixture(scope="module")
def phone(adb: AdbServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualPhone]:
    home = Path(adb.env["HOME"])
    with VirtualPhone(free_port(), load_profile("pixel-6"), tmp_path_factory.mktemp("vstate"),
                      [home / ".android" / "adbkey.pub"]) as ph:
        out = adb("connect", ph.serial, check=True)
        assert b"connected to" in out.stdout, out
        yield ph
        adb("disconnect", ph.serial)


def _wait_state(adb: AdbServer, serial: str, want: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = adb("-s", serial, "get-state").stdout.decode().strip()
        if state == want:
            break
        time.sleep(0.2)
    return state


def test_devices_lists_profile(adb: AdbServer, phone: VirtualPhone) -> None:
    assert _wait_state(adb, phone.serial, "device") == "device"
    listing = adb("devices", "-l", check=True).stdout.decode()
    line = next(x for x in listing.splitlines() if x.startswith(phone.serial))
    # the adb client turns characters other than [A-Za-z0-9._-] into '_'
    assert "device product:oriole model:Pixel_6__virtual_ device:oriole" in line


def test_shell_exit_status_and_stderr_separation(adb: AdbServer, phone: VirtualPhone) -> None:
    s = ("-s", phone.serial)
    assert adb(*s, "shell", "exit 3").returncode == 3
    assert adb(*s, "shell", "true").returncode == 0
    result = adb(*s, "shell", "echo to-out; echo to-err >&2; exit 5")
    assert (result.stdout, result.stderr, result.returncode) == (b"to-out\n", b"to-err\n", 5)
    assert adb(*s, "shell", "getprop", "ro.product.model", check=True).stdout == b"Pixel 6 (virtual)\n"
    assert adb(*s, "shell", "getprop ro.soc.model", check=True).stdout == b"Tensor\n"
    assert adb(*s, "shell", "pwd", check=True).stdout.decode().rstrip().endswith("/data/local/tmp")


def test_sync_list_and_stat(adb: AdbServer, phone: VirtualPhone, tmp_path: Path) -> None:
    folder = phone.sandbox / "data/local/tmp/listing"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.bin").write_bytes(b"x" * 1234)
    (folder / "with space.txt").write_text("hi")
    lines = adb("-s", phone.serial, "ls", "/data/local/tmp/listing", check=True).stdout.decode().splitlines()
    entries = {line.split(None, 3)[3]: line.split(None, 3)[:3] for line in lines}   # mode size mtime name
    assert {"a.bin", "with space.txt"} <= set(entries)
    assert int(entries["a.bin"][1], 16) == 1234 and int(entries["a.bin"][0], 16) & 0o170000 == 0o100000
    # push onto an existing directory STATs it first and lands inside it
    (tmp_path / "into.txt").write_text("inside")
    adb("-s", phone.serial, "push", str(tmp_path / "into.txt"), "/data/local/tmp/listing", check=True)
    assert (folder / "into.txt").read_text() == "inside"


def test_a_phone_without_shell_v2_gets_the_v1_shell(adb: AdbServer, tmp_path: Path) -> None:
    """Android 6 (API 23) adbd has no shell_v2: adb 29 falls back to the `shell:` service, whose
    stream merges stdout and stderr and carries no exit status."""
    from dataclasses import replace

    home = Path(adb.env["HOME"])
    old = replace(load_profile("lowend"), sdk=23, release="6.0")
    with VirtualPhone(free_port(), old, tmp_path / "state", [home / ".android" / "adbkey.pub"]) as ph:
        assert b"connected to" in adb("connect", ph.serial, check=True).stdout
        try:
            assert _wait_state(adb, ph.serial, "device") == "device"
            result = adb("-s", ph.serial, "shell", "echo to-out; echo to-err >&2; exit 5")
            assert result.returncode == 0   # v1: no exit status reaches the client
            assert sorted(result.stdout.split()) == [b"to-err", b"to-out"]
            assert adb("-s", ph.serial, "shell", "getprop ro.build.version.sdk", check=True).stdout.strip() == b"23"
        finally:
            adb("disconnect", ph.serial)


def test_exec_out_is_binary_safe(adb: AdbServer, phone: VirtualPhone) -> None:
    everything = bytes(range(256))
    (phone.sandbox / "data/local/tmp/all.bin").write_bytes(everything * 64)
    out = adb("-s", phone.serial, "exec-out", "cat /data/local/tmp/all.bin", check=True).stdout
    assert out == everything * 64


def test_push_pull_50mb_byte_identical(adb: AdbServer, phone: VirtualPhone, tmp_path: Path) -> None:
    local = tmp_path / "big.bin"
    with open(local, "wb") as f:
        for _ in range(50):
            f.write(os.urandom(1024 * 1024))
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    start = time.monotonic()
    adb("-s", phone.serial, "push", str(local), "/data/local/tmp/fedblocks/big.bin", check=True, timeout=120)
    push_s = time.monotonic() - start
    remote = adb("-s", phone.serial, "shell", "sha256sum /data/local/tmp/fedblocks/big.bin", check=True)
    assert remote.stdout.split()[0].decode() == digest
    start = time.monotonic()
    adb("-s", phone.serial, "pull", "/data/local/tmp/fedblocks/big.bin", str(tmp_path / "back.bin"),
        check=True, timeout=120)
    pull_s = time.monotonic() - start
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == digest
    print(f"adb 29: push 50 MiB {push_s:.2f} s, pull 50 MiB {pull_s:.2f} s")
    # a push into a directory lands under the file's name (adb STATs the target first)
    adb("-s", phone.serial, "push", str(local), "/sdcard/", check=True, timeout=120)
    assert (phone.sandbox / "sdcard/big.bin").stat().st_size == 50 * 1024 * 1024


def test_escapes_refused_through_adb(adb: AdbServer, phone: VirtualPhone, tmp_path: Path) -> None:
    local = tmp_path / "evil"
    local.write_text("owned")
    bad = adb("-s", phone.serial, "push", str(local), "/data/local/tmp/../../etc/passwd")
    assert bad.returncode != 0
    assert adb("-s", phone.serial, "pull", "/etc/passwd", str(tmp_path / "pw")).returncode != 0
    assert not (tmp_path / "pw").exists()


def test_unknown_key_is_not_authorized(adb: AdbServer, tmp_path: Path) -> None:
    other_key = make_key(tmp_path, "other")
    with VirtualPhone(free_port(), load_profile("midrange"), tmp_path / "state", [Path(f"{other_key}.pub")]) as ph:
        connect = adb("connect", ph.serial, timeout=20)
        print("adb connect with an unknown key:", connect.returncode, connect.stdout, connect.stderr)
        state = adb("-s", ph.serial, "get-state").stdout.decode().strip()
        assert state != "device"
        result = adb("-s", ph.serial, "shell", "echo pwned", timeout=20)
        assert result.returncode != 0 and b"pwned" not in result.stdout
        adb("disconnect", ph.serial)
