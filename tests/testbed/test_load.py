"""Load: N virtual phones at once (one host thread each), each receiving a 20 MB artifact
through the device cache plus its own data shard, then running a detached job whose
output proves what it read. No result may be lost, mixed up or corrupted."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedblocks.testbed.adb_backend import AdbDevice
from fedblocks.testbed.cache import DeviceCache
from fedblocks.testbed.device import sha256_file
from fedblocks.testbed.keys import AdbKey

ARTIFACT_BYTES = 20 * 1024 * 1024

# The job: hash both files ON the phone, then a python3 step that reads the shard and
# writes its length and the phone's serial; the host checks every field.
JOB = (
    'A=$(sha256sum < "$1" | cut -d" " -f1); S=$(sha256sum < "$2" | cut -d" " -f1); '
    'python3 -c "import sys; d=open(sys.argv[1],\'rb\').read(); print(\'shard_bytes\', len(d))" "$2" > py.txt '
    '&& echo "artifact $A" && echo "shard $S" && cat py.txt && echo "serial $3"'
)


@dataclass
class Outcome:
    serial: str
    pushed: int
    hits_after: int
    lines: list[str]
    exit_code: int | None
    seconds: float


def _run_phone(serial: str, key: AdbKey, artifact: Path, artifact_sha: str, shard: Path) -> Outcome:
    start = time.monotonic()
    with AdbDevice.connect(serial, keys=[key], auth_timeout_s=20, transport_timeout_s=30,
                           transfer_timeout_s=120) as device:
        cache = DeviceCache(device)
        remote_artifact = cache.ensure(artifact, artifact_sha)
        remote_shard = cache.ensure(shard)
        workdir = f"{device.base_dir}/load"
        handle = device.start_job(["sh", "-c", JOB, "job", remote_artifact, remote_shard, serial], workdir)
        status = device.wait_job(handle, timeout_s=240, poll_s=0.5)
        # a second round reuses the cached artifact: no push
        cache.ensure(artifact, artifact_sha)
        log = device.shell(["cat", handle.log_path], 60).check("read the job log").stdout
        return Outcome(serial, cache.stats.pushes, cache.stats.hits, log.splitlines(), status.exit_code,
                       time.monotonic() - start)


def _load(count: int, tmp_path: Path, adb_key: AdbKey, pick_port: object) -> None:
    from fedblocks.testbed.virtual import VirtualTestbed, load_profile

    artifact = tmp_path / "stage.pte"
    artifact.write_bytes(os.urandom(ARTIFACT_BYTES))
    artifact_sha = sha256_file(artifact)
    shards = []
    for i in range(count):
        shard = tmp_path / f"shard-{i}.npz"
        shard.write_bytes(os.urandom(50_000 + i * 1000))  # distinct per phone: results cannot be mixed up
        shards.append(shard)
    base = _free_block(count, pick_port)
    testbed = VirtualTestbed(count, base, load_profile("midrange"), state_dir=tmp_path / "phones",
                             authorized_keys=[Path(str(adb_key.path) + ".pub")])
    try:
        boot = time.monotonic()
        with ThreadPoolExecutor(max_workers=count) as pool:  # boot the phones side by side
            list(pool.map(lambda phone: phone.start(), testbed.phones))
        boot = time.monotonic() - boot
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [pool.submit(_run_phone, serial, adb_key, artifact, artifact_sha, shards[i])
                       for i, serial in enumerate(testbed.serials)]
            outcomes = [f.result() for f in futures]
        elapsed = time.monotonic() - start
    finally:
        testbed.stop()
    print(f"\n{count} phones booted in {boot:.1f} s; {ARTIFACT_BYTES >> 20} MB each + job: {elapsed:.1f} s wall, "
          f"slowest phone {max(o.seconds for o in outcomes):.1f} s")
    assert [o.serial for o in outcomes] == testbed.serials
    for i, outcome in enumerate(outcomes):
        assert outcome.exit_code == 0, outcome
        assert outcome.pushed == 2 and outcome.hits_after == 1, outcome
        assert outcome.lines == [
            f"artifact {artifact_sha}",
            f"shard {sha256_file(shards[i])}",
            f"shard_bytes {shards[i].stat().st_size}",
            f"serial {outcome.serial}",
        ], outcome


def _free_block(count: int, pick_port: object) -> int:
    """A base port with ``count`` free ports after it (outside the adb emulator range)."""
    import socket

    for _ in range(50):
        base = pick_port()  # type: ignore[operator]
        if base + count > 65535 or any(5555 <= p <= 5585 for p in range(base, base + count)):
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no block of free ports")


def test_load_8_phones(tmp_path: Path, adb_key: AdbKey, pick_port: object) -> None:
    pytest.importorskip("fedblocks.testbed.virtual")
    _load(8, tmp_path, adb_key, pick_port)


@pytest.mark.slow
def test_load_16_phones(tmp_path: Path, adb_key: AdbKey, pick_port: object) -> None:
    pytest.importorskip("fedblocks.testbed.virtual")
    _load(16, tmp_path, adb_key, pick_port)
