"""A virtual phone driven by adb-shell and by a raw protocol client: services, security, faults."""

from __future__ import annotations

import hashlib
import itertools
import os
import shlex
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from adb_shell import exceptions as adb_exc
from adb_shell.auth.sign_pythonrsa import PythonRSASigner
from vphone_support import (
    RawClient,
    adb_shell_device,
    free_port,
    load_private_key,
    make_key,
    parse_shell_v2,
    sync_data,
    sync_done,
    sync_send_request,
    sync_status,
)

from fedblocks.testbed.adb import protocol as p
from fedblocks.testbed.errors import TestbedError
from fedblocks.testbed.virtual import VirtualPhone, VirtualTestbed, load_profile


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("vkeys")
    return {"trusted": make_key(directory, "trusted"), "stranger": make_key(directory, "stranger")}


@pytest.fixture(scope="module")
def phone(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Iterator[VirtualPhone]:
    state = tmp_path_factory.mktemp("vstate")
    with VirtualPhone(free_port(), load_profile("flagship"), state, [Path(f"{keys['trusted']}.pub")]) as ph:
        yield ph


def _rc(device: object, command: str) -> tuple[str, int]:
    """v1 shell has no exit status: append it, as the host backend does."""
    out = device.shell(f"{command}; echo \"__rc=$?\"")  # type: ignore[attr-defined]
    body, _, rc = out.rpartition("__rc=")
    return body, int(rc.strip())


def test_adb_shell_shell_push_pull_stat_list(phone: VirtualPhone, keys: dict[str, Path], tmp_path: Path) -> None:
    device = adb_shell_device(phone.port, keys["trusted"])
    try:
        assert device.shell("getprop ro.product.model").strip() == "Virtual F8 Pro"
        assert device.shell("getprop ro.product.cpu.abi").strip() == "arm64-v8a"
        assert device.shell("getprop ro.build.version.sdk").strip() == "34"
        assert "[ro.soc.model]: [SM8550]" in device.shell("getprop")
        assert device.shell("getprop no.such.prop").strip() == ""
        assert "MemTotal:        8388608 kB" in device.shell("cat /proc/meminfo")
        # v1 merges stderr into the one stream
        assert device.shell("echo out; echo err >&2") == "out\nerr\n"
        _body, rc = _rc(device, "false")
        assert rc == 1
        # the device runtime's python is on PATH and works
        assert device.shell("python3 -c 'import numpy, sys; print(sys.version_info[0])'").strip() == "3"
        payload = os.urandom(3 * 1024 * 1024 + 17)
        local = tmp_path / "blob.bin"
        local.write_bytes(payload)
        device.push(str(local), "/data/local/tmp/fedblocks/cache/blob.bin")
        digest = device.shell("sha256sum /data/local/tmp/fedblocks/cache/blob.bin").split()[0]
        assert digest == hashlib.sha256(payload).hexdigest()
        mode, size, _mtime = device.stat("/data/local/tmp/fedblocks/cache/blob.bin")
        assert size == len(payload) and mode & 0o170000 == 0o100000
        assert device.stat("/data/local/tmp/nothing") == (0, 0, 0)
        names = {entry.filename.decode() for entry in device.list("/data/local/tmp/fedblocks/cache")}
        assert names == {".", "..", "blob.bin"}
        device.pull("/data/local/tmp/fedblocks/cache/blob.bin", str(tmp_path / "back.bin"))
        assert (tmp_path / "back.bin").read_bytes() == payload
        assert (phone.sandbox / "data/local/tmp/fedblocks/cache/blob.bin").read_bytes() == payload
        # /sdcard and /storage/emulated/0 are the same place
        device.push(str(local), "/sdcard/Download/b.bin")
        assert device.stat("/storage/emulated/0/Download/b.bin")[1] == len(payload)
        # exec: binary safe, no pty translation
        raw = device.exec_out("printf '\\000\\001\\377\\n\\r'", decode=False)
        assert raw == b"\x00\x01\xff\n\r"
    finally:
        device.close()


def test_concurrent_connections_and_streams(phone: VirtualPhone, keys: dict[str, Path]) -> None:
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            device = adb_shell_device(phone.port, keys["trusted"])
            try:
                results[i] = device.shell(f"sleep 0.2; echo worker-{i}").strip()
            finally:
                device.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert results == {i: f"worker-{i}" for i in range(6)}
    assert time.monotonic() - start < 6  # they ran in parallel, not one after another

    # several streams on one connection, interleaved
    client = RawClient(phone.port)
    client.connect(load_private_key(keys["trusted"]))
    streams = [client.open(f"shell,v2,raw:sleep 0.{i}; echo s{i}; exit {i}".encode()) for i in range(1, 4)]
    outputs: dict[int, bytearray] = {local: bytearray() for local, _ in streams}
    remotes = dict(streams)
    open_streams = set(outputs)
    while open_streams:
        msg = client.recv()
        local = msg.arg1
        if msg.command == p.A_WRTE:
            outputs[local] += msg.data
            client.send(p.A_OKAY, local, remotes[local])
        elif msg.command == p.A_CLSE:
            client.send(p.A_CLSE, local, remotes[local])
            open_streams.discard(local)
    for i, (local, _) in enumerate(streams, 1):
        assert parse_shell_v2(bytes(outputs[local])) == (f"s{i}\n".encode(), b"", i)
    client.close()


def test_shell_v2_stdin_stderr_exit_code_over_split_packets(phone: VirtualPhone, keys: dict[str, Path]) -> None:
    client = RawClient(phone.port)
    client.connect(load_private_key(keys["trusted"]))
    local, remote = client.open(b"shell,v2,raw:tr a-z A-Z; echo oops >&2; exit 42")
    stream = p.shell_packet(p.SHELL_STDIN, b"hello ") + p.shell_packet(p.SHELL_STDIN, b"phone\n") \
        + p.shell_packet(p.SHELL_CLOSE_STDIN, b"")
    for piece in (stream[:3], stream[3:9], stream[9:]):   # boundaries inside packet headers
        client.write(local, remote, piece)
    out, err, code = parse_shell_v2(client.read_until_close(local, remote))
    assert (out, err, code) == (b"HELLO PHONE\n", b"oops\n", 42)
    client.close()


def test_sync_requests_split_across_writes(phone: VirtualPhone, keys: dict[str, Path]) -> None:
    client = RawClient(phone.port)
    client.connect(load_private_key(keys["trusted"]))
    local, remote = client.open(b"sync:")
    body = os.urandom(200_000)
    stream = sync_send_request("/data/local/tmp/split.bin", 0o100600)
    for start in range(0, len(body), p.SYNC_DATA_MAX):
        stream += sync_data(body[start:start + p.SYNC_DATA_MAX])
    stream += sync_done()
    cuts = [0, 5, 13, 70_001, 70_002, 150_000, len(stream)]
    for a, b in itertools.pairwise(cuts):
        client.write(local, remote, stream[a:b])
    reply = client.recv()
    assert reply.command == p.A_WRTE and sync_status(reply.data) == (p.ID_OKAY, b"")
    client.send(p.A_OKAY, local, remote)
    client.write(local, remote, p.sync_request(p.ID_QUIT))
    client.close()
    target = phone.sandbox / "data/local/tmp/split.bin"
    assert target.read_bytes() == body
    assert target.stat().st_mtime == 1_700_000_000
    assert target.stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------------------ security
def test_unknown_key_and_no_key_are_refused(phone: VirtualPhone, keys: dict[str, Path]) -> None:
    with pytest.raises((adb_exc.AdbConnectionError, adb_exc.AdbTimeoutError, adb_exc.TcpTimeoutException,
                        ConnectionError, OSError)):
        adb_shell_device(phone.port, keys["stranger"], timeout=1.5)
    from adb_shell.adb_device import AdbDeviceTcp

    device = AdbDeviceTcp("127.0.0.1", phone.port, default_transport_timeout_s=3)
    with pytest.raises(adb_exc.DeviceAuthError):
        device.connect(rsa_keys=[], auth_timeout_s=2)
    # a wrong signature gets a fresh token, never a CNXN
    client = RawClient(phone.port)
    token_msg = client.connect(None)
    client.send(p.A_AUTH, p.AUTH_SIGNATURE, 0, p.sign_token(load_private_key(keys["stranger"]), token_msg.data))
    again = client.recv()
    assert again.command == p.A_AUTH and again.arg0 == p.AUTH_TOKEN and again.data != token_msg.data
    # offering an unknown public key closes the connection
    client.send(p.A_AUTH, p.AUTH_RSAPUBLICKEY, 0, PythonRSASigner.FromRSAKeyPath(str(keys["stranger"]))
                .GetPublicKey().encode() + b"\0")
    with pytest.raises((ConnectionError, OSError)):
        client.recv()
    client.close()


def test_nothing_runs_before_authentication(phone: VirtualPhone, tmp_path: Path) -> None:
    canary = phone.sandbox / "data/local/tmp/preauth-canary"
    client = RawClient(phone.port, timeout=1.5)
    client.connect(None)   # got a token, never answered it
    client.send(p.A_OPEN, 1, 0, f"shell:touch {canary}\0".encode())
    with pytest.raises(socket.timeout):
        client.recv()
    client.close()
    # also without even a CNXN
    client = RawClient(phone.port, timeout=1.0)
    client.send(p.A_OPEN, 1, 0, f"shell:touch {canary}\0".encode())
    with pytest.raises(socket.timeout):
        client.recv()
    client.close()
    time.sleep(0.3)
    assert not canary.exists()


def test_sync_escapes_are_refused(phone: VirtualPhone, keys: dict[str, Path], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (phone.sandbox / "data/local/tmp/escape").symlink_to(outside)
    local = tmp_path / "x"
    local.write_text("payload")
    device = adb_shell_device(phone.port, keys["trusted"])
    try:
        for target in ("/data/local/tmp/../../../../etc/passwd", "../../etc/passwd", "/etc/passwd",
                       "/data/local/tmp/escape/secret", "/data/local/tmp/escape/newfile",
                       "/system/bin/sh"):
            with pytest.raises((adb_exc.PushFailedError, adb_exc.AdbCommandFailureException)):
                device.push(str(local), target)
        for source in ("/etc/passwd", "/data/local/tmp/escape/secret", "/data/local/tmp/../../../etc/passwd"):
            with pytest.raises(adb_exc.AdbCommandFailureException):
                device.pull(source, str(tmp_path / "stolen"))
        assert device.stat("/data/local/tmp/escape/secret") == (0, 0, 0)
        assert device.list("/data/local/tmp/escape") == []
        # the phone is still healthy afterwards
        assert device.shell("echo ok").strip() == "ok"
    finally:
        device.close()
    assert (outside / "secret").read_text() == "secret"
    assert not (outside / "newfile").exists()
    assert "payload" not in Path("/etc/passwd").read_text()


def test_hostile_file_names_are_inert_with_shlex_quote(phone: VirtualPhone, keys: dict[str, Path],
                                                       tmp_path: Path) -> None:
    canary = phone.sandbox / "data/local/tmp/CANARY"
    names = ["with space.bin", "quote'single.bin", 'quote"double.bin', "semi;touch CANARY.bin",
             "$(touch CANARY).bin", "`touch CANARY`.bin", "new\nline.bin", "-dash.bin"]
    device = adb_shell_device(phone.port, keys["trusted"])
    try:
        for i, name in enumerate(names):
            local = tmp_path / f"f{i}"
            local.write_bytes(name.encode() * 3)
            device.push(str(local), f"/data/local/tmp/hostile/{name}")
        listing = device.shell(f"ls -1 -- {shlex.quote('/data/local/tmp/hostile')}")
        for name in names:
            if "\n" not in name:
                assert name in listing.splitlines()
        for name in names:
            path = shlex.quote(f"/data/local/tmp/hostile/{name}")
            out = device.shell(f"sha256sum -- {path}")
            assert out.split()[0].lstrip("\\") == hashlib.sha256(name.encode() * 3).hexdigest(), name
        assert not canary.exists()
        assert not (phone.sandbox / "data/local/tmp/hostile/CANARY").exists()
    finally:
        device.close()


# ------------------------------------------------------------------------------ faults
def test_dropped_connection_mid_push_leaves_no_partial_file(phone: VirtualPhone, keys: dict[str, Path]) -> None:
    target_dir = phone.sandbox / "data/local/tmp/partial"
    client = RawClient(phone.port)
    client.connect(load_private_key(keys["trusted"]))
    local, remote = client.open(b"sync:")
    client.write(local, remote, sync_send_request("/data/local/tmp/partial/model.pte") + sync_data(b"x" * 60_000))
    client.write(local, remote, sync_data(b"y" * 60_000))
    time.sleep(0.2)
    assert target_dir.is_dir() and not (target_dir / "model.pte").exists()
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    deadline = time.monotonic() + 5
    while any(target_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(target_dir.iterdir()) == []   # no target, no temp file left over


def test_killed_adbd_gives_client_errors_not_hangs(tmp_path: Path, keys: dict[str, Path]) -> None:
    phone = VirtualPhone(free_port(), load_profile("midrange"), tmp_path, [Path(f"{keys['trusted']}.pub")])
    with phone:
        device = adb_shell_device(phone.port, keys["trusted"], timeout=5)
        assert device.shell("echo alive").strip() == "alive"
        errors: list[BaseException] = []
        raw = RawClient(phone.port)
        raw.connect(load_private_key(keys["trusted"]))
        raw_local, raw_remote = raw.open(b"shell,v2,raw:sleep 30")

        def long_command() -> None:
            # adb-shell treats EOF as "no data yet" and keeps polling until read_timeout_s
            try:
                device.shell("sleep 30", read_timeout_s=2)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=long_command)
        t.start()
        time.sleep(0.5)
        start = time.monotonic()
        phone.kill_adbd()
        with pytest.raises(ConnectionError):   # the transport closes at once
            raw.read_until_close(raw_local, raw_remote)
        assert time.monotonic() - start < 3
        raw.close()
        t.join(15)
        assert not t.is_alive()
        assert errors and time.monotonic() - start < 10
        with pytest.raises((ConnectionError, OSError, adb_exc.AdbConnectionError, adb_exc.TcpTimeoutException)):
            adb_shell_device(phone.port, keys["trusted"], timeout=2)
        # the phone can come back (a "reboot") on the same port with the same sandbox
        phone.start()
        device = adb_shell_device(phone.port, keys["trusted"])
        assert device.shell("echo back").strip() == "back"
        device.close()


def test_testbed_of_phones(tmp_path: Path, keys: dict[str, Path]) -> None:
    base = free_port()
    profiles = [load_profile("lowend"), load_profile("pixel-6")]
    try:
        testbed = VirtualTestbed(2, base, profiles, tmp_path, [Path(f"{keys['trusted']}.pub")])
    except TestbedError:
        pytest.skip("port range not free")
    with testbed:
        assert testbed.serials == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
        models = []
        for phone in testbed.phones:
            device = adb_shell_device(phone.port, keys["trusted"])
            models.append(device.shell("getprop ro.product.model").strip())
            device.close()
        assert models == ["Virtual A2 Lite", "Pixel 6 (virtual)"]


def test_phone_refuses_reserved_and_busy_ports(tmp_path: Path, keys: dict[str, Path]) -> None:
    key = [Path(f"{keys['trusted']}.pub")]
    with pytest.raises(TestbedError, match="5555-5585"):
        VirtualPhone(5555, load_profile("midrange"), tmp_path, key)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TestbedError, match="not free"):
            VirtualPhone(port, load_profile("midrange"), tmp_path, key).start()
    with pytest.raises(TestbedError, match="no authorized adb keys"):
        VirtualPhone(free_port(), load_profile("midrange"), tmp_path, [])
    bad = tmp_path / "bad.pub"
    bad.write_text("not-a-key user@host\n")
    with pytest.raises(TestbedError, match="line 1"):
        VirtualPhone(free_port(), load_profile("midrange"), tmp_path, [bad])


def test_pty_shell_and_orphans_are_reaped(phone: VirtualPhone, keys: dict[str, Path]) -> None:
    client = RawClient(phone.port)
    client.connect(load_private_key(keys["trusted"]))
    local, remote = client.open(b"shell,v2,TERM=xterm,pty:")
    received = bytearray()
    client.write_collecting(local, remote, p.shell_packet(p.SHELL_WINDOW_SIZE, b"40x100,0x0"), received)
    client.write_collecting(local, remote, p.shell_packet(p.SHELL_STDIN, b"stty size; echo pty-$((6*7)); exit 7\n"),
                            received)
    out, _err, code = parse_shell_v2(client.read_until_close(local, remote, received))
    assert b"40 100" in out and b"pty-42" in out and code == 7
    client.close()
    # a background job outlives its shell: adbd adopts it (subreaper) and reaps it when it ends
    device = adb_shell_device(phone.port, keys["trusted"])
    try:
        device.shell("nohup sleep 0.3 >/dev/null 2>&1 &")
    finally:
        device.close()
    assert phone.process is not None
    from fedblocks.testbed.virtual.proctree import descendants

    adopted = [info for info in descendants(phone.process.pid) if info.ppid == phone.process.pid]
    assert adopted, "the orphaned sleep should be a child of adbd"
    # the sleep ends after 0.3 s; adbd reaps it at its next SIGCHLD (polled: a loaded machine may
    # take a while to schedule adbd, which is not a leak)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        zombies = [info for info in descendants(phone.process.pid) if info.state == "Z"]
        alive = [info for info in descendants(phone.process.pid) if info.pid in {a.pid for a in adopted}]
        if not zombies and not alive:
            break
        time.sleep(0.1)
    assert zombies == [] and alive == []


def test_root_and_unknown_services(phone: VirtualPhone, keys: dict[str, Path]) -> None:
    client = RawClient(phone.port)
    client.connect(load_private_key(keys["trusted"]))
    local, remote = client.open(b"root:")
    assert client.read_until_close(local, remote) == b"adbd cannot run as root in production builds\n"
    with pytest.raises(ConnectionRefusedError):
        client.open(b"jdwp:1234")
    client.close()


@pytest.mark.parametrize("namespace", ["1", "0"])
def test_absolute_android_paths_inside_files(namespace: str, tmp_path: Path, keys: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A job file naming /data/local/tmp/... works: directly when the phone has its own mount
    namespace, via $FEDBLOCKS_DEVICE_ROOT + path when it rewrites paths."""
    monkeypatch.setenv("FEDBLOCKS_VPHONE_NAMESPACE", namespace)
    with VirtualPhone(free_port(), load_profile("midrange"), tmp_path, [Path(f"{keys['trusted']}.pub")]) as ph:
        if namespace == "1" and ph.path_mapping != "namespace":
            pytest.skip("mount namespaces are not available here (needs root or user namespaces)")
        assert ph.path_mapping == ("namespace" if namespace == "1" else "rewrite")
        device = adb_shell_device(ph.port, keys["trusted"])
        try:
            data = tmp_path / "data.bin"
            data.write_bytes(b"shard-bytes")
            device.push(str(data), "/storage/emulated/0/shard.bin")
            job = tmp_path / "job.txt"
            job.write_text("/sdcard/shard.bin")
            device.push(str(job), "/data/local/tmp/job.txt")
            reader = ("import os\npath = open('job.txt').read()\n"
                      "root = '' if os.path.exists(path) else os.environ['FEDBLOCKS_DEVICE_ROOT']\n"
                      "print(open(root + path, 'rb').read().decode(), bool(root))\n")
            (tmp_path / "reader.py").write_text(reader)
            device.push(str(tmp_path / "reader.py"), "/data/local/tmp/reader.py")
            out = device.shell("cd /data/local/tmp && python3 reader.py").split()
            assert out == ["shard-bytes", "False" if namespace == "1" else "True"]
            if namespace == "1":
                assert device.shell("pwd; echo $HOME; command -v getprop").split() == \
                    ["/data/local/tmp", "/data/local/tmp", "/system/bin/getprop"]
        finally:
            device.close()


def test_a_key_created_after_the_phone_started_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like adbd re-reading adb_keys: with the default key files, ~/.android/adbkey.pub that adb
    creates on its first start (after the phone is up) is trusted without restarting the phone."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    monkeypatch.delenv("FEDBLOCKS_ADB_KEY", raising=False)
    phone = VirtualPhone(free_port(), load_profile("midrange"), tmp_path / "state").start()
    try:
        assert phone.authorized_keys == []   # no key anywhere yet: the phone starts and waits for one
        (tmp_path / "home" / ".android").mkdir(parents=True)
        key = make_key(tmp_path / "home" / ".android")
        device = adb_shell_device(phone.port, key)
        assert device.shell("echo trusted").strip() == "trusted"
        device.close()
    finally:
        phone.stop()
