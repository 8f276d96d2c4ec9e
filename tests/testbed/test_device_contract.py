"""The Device contract, the same tests on every backend: LocalDevice and AdbDevice
talking the real ADB protocol to a virtual phone."""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedblocks.testbed.device import (
    Device,
    DeviceError,
    DeviceTimeout,
    TransferError,
    sha256_file,
)
from fedblocks.testbed.keys import AdbKey
from fedblocks.testbed.local_backend import LocalDevice


@pytest.fixture(scope="module", params=["local", "adb", pytest.param("real", marks=pytest.mark.device)])
def device(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           adb_key: AdbKey) -> Iterator[Device]:
    if request.param == "local":
        dev: Device = LocalDevice(tmp_path_factory.mktemp("localdev"))
    elif request.param == "real":
        serial = os.environ.get("FEDBLOCKS_SERIAL")
        if not serial:
            pytest.skip("set FEDBLOCKS_SERIAL to a phone's serial (HOST:PORT or USB) to run on a real phone")
        from fedblocks.testbed.inventory import open_device

        dev = open_device(serial)  # the host's default adb key
    else:
        from fedblocks.testbed.adb_backend import AdbDevice

        phone = request.getfixturevalue("virtual_phone")
        dev = AdbDevice.connect(phone.serial, keys=[adb_key], auth_timeout_s=5)
    yield dev
    dev.close()


@pytest.fixture
def workdir(device: Device) -> Iterator[str]:
    path = f"{device.base_dir}/t-{secrets.token_hex(4)}"
    device.makedirs(path)
    yield path
    device.remove(path)


def _random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_push_pull_roundtrip_with_progress(device: Device, workdir: str, tmp_path: Path) -> None:
    local = _random_file(tmp_path / "blob.bin", 2_500_000 + 17)
    seen: list[tuple[int, int]] = []
    remote = f"{workdir}/nested/dir/blob.bin"
    device.push(local, remote, lambda done, total: seen.append((done, total)))
    assert seen[-1] == (local.stat().st_size, local.stat().st_size)
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(seen)), "progress must be a running total"
    assert device.size(remote) == local.stat().st_size
    assert device.sha256(remote) == sha256_file(local)
    # no temporary file is left beside the target
    listing = device.shell(["ls", "-a", f"{workdir}/nested/dir"]).check("ls").stdout.split()
    assert sorted(n for n in listing if n not in (".", "..")) == ["blob.bin"]

    back = tmp_path / "back" / "blob.bin"
    pulled: list[tuple[int, int]] = []
    device.pull(remote, back, lambda done, total: pulled.append((done, total)))
    assert back.read_bytes() == local.read_bytes()
    assert pulled[-1] == (local.stat().st_size, local.stat().st_size)


def test_push_empty_file_and_overwrite(device: Device, workdir: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    device.push(empty, f"{workdir}/f")
    assert device.size(f"{workdir}/f") == 0
    full = _random_file(tmp_path / "full", 1000)
    device.push(full, f"{workdir}/f")
    assert device.sha256(f"{workdir}/f") == sha256_file(full)


def test_pull_missing_is_a_clear_error(device: Device, workdir: str, tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="does not exist"):
        device.pull(f"{workdir}/nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_push_missing_local_file(device: Device, workdir: str, tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="is not a file"):
        device.push(tmp_path / "absent", f"{workdir}/x")


def test_shell_exit_codes_stdout_stderr(device: Device) -> None:
    res = device.shell("echo out; echo err >&2; exit 3")
    assert res.exit_code == 3 and not res.ok
    assert res.stdout == "out\n"
    assert res.stderr == "err\n"
    assert device.shell("true").exit_code == 0
    assert device.shell("exit 255").exit_code == 255
    with pytest.raises(DeviceError, match="exit 3"):
        res.check("the test command")


def test_shell_argv_is_quoted(device: Device) -> None:
    tricky = "a b'c\"d $HOME `id` $(echo no) ; | & \\"
    res = device.shell(["printf", "%s", tricky])
    assert res.stdout == tricky


def test_shell_binary_safe_output(device: Device) -> None:
    res = device.shell("printf 'x\\000y\\303\\251'")
    assert res.stdout == "x\x00yé"


def test_shell_timeout_raises_and_device_stays_usable(device: Device) -> None:
    start = time.monotonic()
    with pytest.raises(DeviceTimeout, match="within 1 s"):
        device.shell("sleep 20", timeout_s=1)
    assert time.monotonic() - start < 6
    assert device.shell("echo alive").stdout == "alive\n"


def test_exists_size_sha256(device: Device, workdir: str, tmp_path: Path) -> None:
    assert device.exists(workdir)
    assert not device.exists(f"{workdir}/missing")
    assert device.size(f"{workdir}/missing") is None
    with pytest.raises(DeviceError, match="no such file"):
        device.sha256(f"{workdir}/missing")
    local = _random_file(tmp_path / "a", 4096)
    device.push(local, f"{workdir}/a")
    assert device.exists(f"{workdir}/a")
    assert device.sha256(f"{workdir}/a") == sha256_file(local)


def test_properties(device: Device, request: pytest.FixtureRequest) -> None:
    props = device.properties()
    assert props.serial == device.serial
    assert props.model and props.abi
    assert props.ram_mb is not None and props.ram_mb > 0
    if request.node.callspec.params["device"] == "adb":
        # the virtual phone's midrange profile, read through getprop / meminfo / sysfs
        from fedblocks.testbed.virtual import load_profile

        profile = load_profile("midrange")
        assert props.model == profile.model
        assert props.soc == profile.soc
        assert props.abi == profile.abi
        assert props.sdk == profile.sdk
        assert props.ram_mb == profile.ram_mb
        assert props.battery_pct is not None and 0 <= props.battery_pct <= 100
        assert props.temperature_c is not None and 0 < props.temperature_c < 100


def test_detached_job_start_poll_exit(device: Device, workdir: str) -> None:
    handle = device.start_job("echo started; sleep 1; echo finished; exit 7", workdir)
    status = device.poll_job(handle)
    assert status.running and status.state == "running" and status.exit_code is None
    final = device.wait_job(handle, timeout_s=20, poll_s=0.2)
    assert final.state == "exited" and final.exit_code == 7 and not final.running
    assert final.log_tail.splitlines() == ["started", "finished"]


def test_detached_job_runs_in_workdir_and_outlives_shell_timeouts(device: Device, workdir: str) -> None:
    handle = device.start_job(["sh", "-c", "sleep 2; pwd > where.txt"], workdir)
    # a short shell timeout elsewhere must not touch the job
    with pytest.raises(DeviceTimeout):
        device.shell("sleep 10", timeout_s=0.5)
    final = device.wait_job(handle, timeout_s=20, poll_s=0.2)
    assert final.exit_code == 0
    where = device.shell(["cat", f"{workdir}/where.txt"]).check("cat").stdout.strip()
    assert where.endswith(workdir.rsplit("/", 1)[-1])


def test_detached_job_kill(device: Device, workdir: str) -> None:
    handle = device.start_job("sleep 60 & sleep 60; echo never", workdir)
    assert device.poll_job(handle).running
    status = device.kill_job(handle, grace_s=2)
    assert status.state == "killed" and not status.running and status.exit_code is not None
    assert "never" not in status.log_tail
    # the whole process group is gone: no sleep of this job survives
    time.sleep(0.2)
    group = device.shell(f"cat /proc/[0-9]*/stat 2>/dev/null | awk -v g={handle.pid} '$5 == g && $3 != \"Z\"' | wc -l")
    assert group.stdout.strip() == "0", "processes of the killed job's group survive"


def test_poll_lost_job(device: Device, workdir: str) -> None:
    handle = device.start_job("sleep 30", workdir)
    # simulate a reboot: the process dies without the wrapper writing an exit status
    device.shell(f"kill -KILL -{handle.pid} 2>/dev/null || kill -KILL {handle.pid}")
    time.sleep(0.3)
    status = device.poll_job(handle)
    assert status.state == "lost" and not status.running and status.exit_code is None


def test_job_id_validated(device: Device, workdir: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        device.start_job("true", workdir, job_id="../../etc")


def test_hostile_file_names_are_never_executed(device: Device, workdir: str, tmp_path: Path) -> None:
    canary = f"{workdir}/CANARY"
    names = [
        "with space.bin",
        "quote'single.bin",
        'quote"double.bin',
        f"semi;touch {canary};.bin",
        f"subst$(touch {canary}).bin",
        f"tick`touch {canary}`.bin",
        "dollar$HOME.bin",
        "-leading-dash.bin",
        "new\nline.bin",
    ]
    for name in names:
        name_on_host = name.replace("/", "_")
        local = _random_file(tmp_path / name_on_host.replace("\n", "_"), 300)
        remote = f"{workdir}/{name.replace('/', '_')}"
        device.push(local, remote)
        assert device.exists(remote), name
        assert device.sha256(remote) == sha256_file(local), name
        assert device.size(remote) == 300
        back = tmp_path / "back.bin"
        device.pull(remote, back)
        assert back.read_bytes() == local.read_bytes()
        device.remove(remote)
        assert not device.exists(remote), name
    assert not device.exists(canary), "a file name was executed by the device shell"


def test_push_to_an_unwritable_place_is_a_clear_error(device: Device, tmp_path: Path) -> None:
    local = _random_file(tmp_path / "x.bin", 100)
    with pytest.raises(DeviceError, match="mkdir -p '/proc/fedblocks-nope'"):
        device.push(local, "/proc/fedblocks-nope/x.bin")


def test_listdir_and_pull_dir(device: Device, workdir: str, tmp_path: Path) -> None:
    files = {"status.json": 100, "metrics.json": 2000, "sub/weights.npz": 300_000, "sub/deeper/a b;c": 10}
    for rel, size in files.items():
        device.push(_random_file(tmp_path / "src.bin", size), f"{workdir}/bundle/{rel}")
    device.shell(["ln", "-s", "/etc/passwd", f"{workdir}/bundle/link"]).check("ln")
    names = [(e.name, e.kind) for e in device.listdir(f"{workdir}/bundle")]
    assert names == [("link", "other"), ("metrics.json", "file"), ("status.json", "file"), ("sub", "dir")]
    pulled = device.pull_dir(f"{workdir}/bundle", tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in pulled) == sorted(files)
    for rel in files:
        assert sha256_file(tmp_path / "out" / rel) == device.sha256(f"{workdir}/bundle/{rel}")
    assert not (tmp_path / "out" / "link").exists(), "links are not followed"
    with pytest.raises(DeviceError, match="cannot list"):
        device.listdir(f"{workdir}/missing")
    with pytest.raises(DeviceError, match="cannot list"):
        device.listdir(f"{workdir}/bundle/status.json")


def test_one_device_shared_by_threads(device: Device, workdir: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def work(i: int) -> tuple[str, int]:
        res = device.shell(f"echo thread-{i}; exit {i}")
        return res.stdout, res.exit_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(24)))
    assert results == [(f"thread-{i}\n", i) for i in range(24)]
