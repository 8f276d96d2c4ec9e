"""Provisioning and inventory: the runtime push (cached), the readiness checks with the
exact missing piece, device discovery, and the `fedblocks devices` / `testbed provision` CLI."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from fedblocks.host.cli import main as fedblocks_main
from fedblocks.testbed.adb_backend import AdbDevice
from fedblocks.testbed.cache import DeviceCache
from fedblocks.testbed.device import sha256_file
from fedblocks.testbed.inventory import adb_server_devices, discover_serials
from fedblocks.testbed.keys import AdbKey
from fedblocks.testbed.local_backend import LocalDevice
from fedblocks.testbed.provision import (
    RUNTIME_NAME,
    build_runtime,
    check_device,
    provision_device,
    runtime_remote_path,
)


def _path_without_python(tmp_path: Path) -> str:
    """A PATH holding every host tool except python*: a phone without Python."""
    bin_dir = tmp_path / "nopython-bin"
    bin_dir.mkdir()
    for folder in ("/usr/bin", "/bin"):
        for tool in Path(folder).iterdir():
            if not tool.name.startswith("python") and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    return str(bin_dir)


def _python_wrapper(tmp_path: Path, body: str) -> str:
    """A PATH whose python3/python run ``body`` (a sh script), everything else from the host."""
    bin_dir = tmp_path / "fakepython-bin"
    bin_dir.mkdir()
    for name in ("python3", "python"):
        script = bin_dir / name
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def test_no_python_on_path(tmp_path: Path) -> None:
    device = LocalDevice(tmp_path / "dev", env={"PATH": _path_without_python(tmp_path)})
    readiness = check_device(device, deep=False)
    assert not readiness.ready
    assert readiness.problems == [
        "no python3 on PATH: install Python for the adb shell user (docs/testbed.md, Python on the phones)"]


def test_numpy_missing_and_no_engine(tmp_path: Path) -> None:
    # -S: a python without site-packages, so neither numpy nor any engine imports
    device = LocalDevice(tmp_path / "dev",
                         env={"PATH": _python_wrapper(tmp_path, f'exec {sys.executable} -S "$@"')})
    readiness = check_device(device, deep=True)
    assert readiness.python == "python3"
    assert "numpy missing: python3 -m pip install numpy" in readiness.problems
    assert any(p.startswith("no engine: install one of executorch") for p in readiness.problems)
    assert "runtime not pushed: run fedblocks testbed provision" in readiness.problems


def test_python_too_old(tmp_path: Path) -> None:
    # a python that claims 3.8: the probe's JSON is what the device says
    probe = ('printf \'FEDBLOCKS_PROBE {"python": "3.8.10", "numpy": "1.24.0", '
             '"engines": {"torch": {"ok": true, "version": "2.0", "error": null}}}\\n\'')
    device = LocalDevice(tmp_path / "dev", env={"PATH": _python_wrapper(tmp_path, probe)})
    readiness = check_device(device, deep=False)
    assert readiness.usable_engines == ["torch"]
    assert "python3 is 3.8.10; the runtime needs Python >= 3.11" in readiness.problems


def test_garbage_probe_output_is_not_trusted(tmp_path: Path) -> None:
    device = LocalDevice(tmp_path / "dev", env={"PATH": _python_wrapper(tmp_path, "echo FEDBLOCKS_PROBE [1,2")})
    readiness = check_device(device, deep=False)
    assert not readiness.ready
    assert readiness.python_version is None and readiness.engines == {}


def test_broken_python(tmp_path: Path) -> None:
    device = LocalDevice(tmp_path / "dev",
                         env={"PATH": _python_wrapper(tmp_path, "echo 'Segmentation fault' >&2; exit 139")})
    readiness = check_device(device, deep=False)
    assert readiness.problems == ["python3 does not run: Segmentation fault"]


def test_provision_virtual_phone_then_cached(virtual_phone: object, adb_key: AdbKey, tmp_path: Path) -> None:
    runtime = build_runtime(tmp_path)
    digest = sha256_file(runtime)
    with AdbDevice.connect(virtual_phone.serial, keys=[adb_key]) as device:  # type: ignore[attr-defined]
        device.remove(runtime_remote_path(device))
        cache = DeviceCache(device)
        readiness = provision_device(device, runtime, digest, cache, deep=False)
        assert readiness.ready, readiness.problems
        assert readiness.runtime_current and readiness.runtime_sha256 == digest
        assert readiness.runtime_path == f"{device.base_dir}/{RUNTIME_NAME}"
        # the virtual phone runs the host's venv python: every engine is installed
        assert set(readiness.usable_engines) == {"executorch", "torch", "ort"}
        assert cache.stats.pushes == 1
        # provisioning again pushes nothing (same runtime, fresh cache instance)
        again = DeviceCache(device)
        again.ensure(runtime, digest)
        assert again.stats.pushes == 0 and again.stats.hits == 1
        quick = check_device(device, deep=False, runtime_sha256=digest)
        assert quick.ready
        # a changed runtime on the host makes the device's copy out of date
        stale = check_device(device, deep=False, runtime_sha256="f" * 64)
        assert stale.problems == ["runtime out of date: run fedblocks testbed provision"]
        # and the pushed runtime really starts on the phone
        res = device.shell(["python3", readiness.runtime_path, "--help"])
        assert res.exit_code == 0 and "fedblocks-runtime" in res.stdout


def test_discovery_order_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", "1")  # no adb server there
    monkeypatch.setenv("FEDBLOCKS_DEVICES", " 127.0.0.1:7001, local:/tmp/x ,127.0.0.1:7001,")
    assert discover_serials() == ["127.0.0.1:7001", "local:/tmp/x"]
    assert discover_serials(["a:1", "b:2", "a:1"]) == ["a:1", "b:2"]


def test_adb_server_protocol(monkeypatch: pytest.MonkeyPatch, pick_port: object) -> None:
    """A stand-in adb server answering host:devices exactly as adb 29 does."""
    port = pick_port()  # type: ignore[operator]
    server = socket.create_server(("127.0.0.1", port))
    requests: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            length = int(conn.recv(4), 16)
            requests.append(conn.recv(length))
            payload = b"emulator-5554\tdevice\n192.168.1.7:5555\tdevice\nR58M123\tunauthorized\n"
            conn.sendall(b"OKAY" + b"%04x" % len(payload) + payload)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(port))
    monkeypatch.setenv("FEDBLOCKS_DEVICES", "127.0.0.1:7001")
    assert discover_serials() == ["emulator-5554", "192.168.1.7:5555", "127.0.0.1:7001"]
    thread.join(5)
    server.close()
    assert requests == [b"host:devices"]
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", "1")
    assert adb_server_devices() == []


def test_devices_cli(virtual_phone: object, adb_key: AdbKey, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str], pick_port: object) -> None:
    monkeypatch.setenv("FEDBLOCKS_ADB_KEY", str(adb_key.path))
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", "1")
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells to the terminal width
    serial = virtual_phone.serial  # type: ignore[attr-defined]
    dead = f"127.0.0.1:{pick_port()}"  # type: ignore[operator]
    monkeypatch.setenv("FEDBLOCKS_DEVICES", f"{serial},{dead}")

    assert fedblocks_main(["devices", "--json"]) == 0
    rows = {row["serial"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {serial, dead}
    assert rows[serial]["reachable"] and rows[serial]["properties"]["model"] == "Virtual M4"
    assert rows[serial]["properties"]["ram_mb"] == 4096
    assert rows[serial]["readiness"]["python"] == "python3"
    assert not rows[dead]["reachable"] and "cannot connect" in rows[dead]["error"]

    assert fedblocks_main(["devices"]) == 0
    table = capsys.readouterr().out
    assert "Virtual M4" in table and "unreachable" in table, table


def test_provision_cli_lines_and_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], pick_port: object) -> None:
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", "1")
    monkeypatch.setenv("FEDBLOCKS_DEVICES", "")
    # nothing to provision: one line, exit 2
    assert fedblocks_main(["testbed", "provision"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no devices to provision" in err
    # a local "phone" whose python has no site-packages: pushed, then told what is missing
    monkeypatch.setenv("PATH", _python_wrapper(tmp_path, f'exec {sys.executable} -S "$@"') + ":"
                       + os.environ["PATH"])
    local = f"local:{tmp_path / 'phone'}"
    dead = f"127.0.0.1:{pick_port()}"  # type: ignore[operator]
    assert fedblocks_main(["testbed", "provision", "--serial", local, "--serial", dead]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{local}: not ready: numpy missing: python3 -m pip install numpy; "
                               "no engine: install one of executorch")
    assert lines[1].startswith(f"{dead}: unreachable: cannot connect")
    assert (tmp_path / "phone" / RUNTIME_NAME).is_file()
    assert (tmp_path / "phone" / "cache" / sha256_file(tmp_path / "phone" / RUNTIME_NAME)).is_file()


@pytest.mark.slow
def test_provision_cli_deep_on_virtual_phone(virtual_phone: object, adb_key: AdbKey,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The full CLI: push + a real import of every engine on the phone (tens of seconds)."""
    monkeypatch.setenv("FEDBLOCKS_ADB_KEY", str(adb_key.path))
    monkeypatch.setenv("COLUMNS", "200")
    serial = virtual_phone.serial  # type: ignore[attr-defined]
    assert fedblocks_main(["testbed", "provision", "--serial", serial, "--json"]) == 0
    [outcome] = json.loads(capsys.readouterr().out)
    assert outcome["ready"] and outcome["readiness"]["runtime_path"].endswith(RUNTIME_NAME)
    engines = outcome["readiness"]["engines"]
    assert {name for name, e in engines.items() if e["ok"]} == {"executorch", "torch", "ort"}, engines
    assert fedblocks_main(["devices", "--serial", serial]) == 0
    table = capsys.readouterr().out
    assert "Virtual M4" in table and "yes" in table, table


def test_discovery_through_the_real_adb_server(tmp_path: Path, adb_key: AdbKey, phone_factory: object,
                                                 pick_port: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's adb 29 server, on a private port and HOME, `adb connect`ed to a virtual phone."""
    import shutil
    import subprocess

    adb = shutil.which("adb")
    if adb is None:
        pytest.skip("the platform-tools adb binary is not installed")
    home = tmp_path / "home"
    (home / ".android").mkdir(parents=True)
    # the adb server signs with $HOME/.android/adbkey: give it ours, which the phone trusts
    shutil.copy(adb_key.path, home / ".android" / "adbkey")
    shutil.copy(str(adb_key.path) + ".pub", home / ".android" / "adbkey.pub")
    port = str(pick_port())  # type: ignore[operator]
    env = {**os.environ, "HOME": str(home), "ANDROID_ADB_SERVER_PORT": port}
    phone = phone_factory()  # type: ignore[operator]
    try:
        subprocess.run([adb, "start-server"], env=env, check=True, capture_output=True, timeout=30)
        out = subprocess.run([adb, "connect", phone.serial], env=env, capture_output=True, text=True, timeout=30)
        assert "connected to" in out.stdout, out
        monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", port)
        monkeypatch.setenv("FEDBLOCKS_DEVICES", "")
        deadline = time.monotonic() + 15
        while phone.serial not in discover_serials() and time.monotonic() < deadline:
            time.sleep(0.2)  # the server authenticates in the background
        assert discover_serials() == [phone.serial]
        # the adb server holds one connection; fedblocks opens its own beside it
        with AdbDevice.connect(phone.serial, keys=[adb_key]) as device:
            assert device.shell("echo both").stdout == "both\n"
    finally:
        subprocess.run([adb, "kill-server"], env=env, capture_output=True, timeout=30)
