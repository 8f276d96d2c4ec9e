"""The content-addressed device cache, on LocalDevice and on a virtual phone over adb."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedblocks.testbed.cache import DeviceCache
from fedblocks.testbed.device import Device, TransferError, sha256_file
from fedblocks.testbed.keys import AdbKey
from fedblocks.testbed.local_backend import LocalDevice


@pytest.fixture(params=["local", "adb"])
def device(request: pytest.FixtureRequest, tmp_path: Path, adb_key: AdbKey) -> Iterator[Device]:
    if request.param == "local":
        dev: Device = LocalDevice(tmp_path / "dev")
    else:
        from fedblocks.testbed.adb_backend import AdbDevice

        phone = request.getfixturevalue("virtual_phone")
        dev = AdbDevice.connect(phone.serial, keys=[adb_key])
    yield dev
    dev.remove(f"{dev.base_dir}/cache")
    dev.close()


class CountingDevice:
    """Counts raw pushes that reach the device (wraps the backend's _push_raw)."""

    def __init__(self, device: Device) -> None:
        self.raw_pushes = 0
        original = device._push_raw

        def counted(*args: object) -> None:
            self.raw_pushes += 1
            original(*args)  # type: ignore[arg-type]

        device._push_raw = counted  # type: ignore[method-assign]


def _artifact(tmp_path: Path, name: str, size: int = 300_000) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def test_ensure_pushes_once_per_content(device: Device, tmp_path: Path) -> None:
    counter = CountingDevice(device)
    art = _artifact(tmp_path, "model.pte")
    cache = DeviceCache(device)
    remote = cache.ensure(art)
    assert remote == f"{device.base_dir}/cache/{sha256_file(art)}"
    assert device.sha256(remote) == sha256_file(art)
    for _ in range(3):
        assert cache.ensure(art) == remote
    # same content under another name: still no push
    copy = tmp_path / "copy.bin"
    copy.write_bytes(art.read_bytes())
    assert cache.ensure(copy, sha256_file(copy)) == remote
    assert (cache.stats.pushes, cache.stats.hits, counter.raw_pushes) == (1, 4, 1)

    # a new session (new DeviceCache) verifies the device's copy and does not push again
    fresh = DeviceCache(device)
    assert fresh.ensure(art) == remote
    assert (fresh.stats.pushes, fresh.stats.hits, counter.raw_pushes) == (0, 1, 1)

    # different content is pushed
    other = _artifact(tmp_path, "other.pte", 1000)
    fresh.ensure(other)
    assert counter.raw_pushes == 2 and fresh.stats.pushes == 1


def test_corrupt_cached_copy_is_detected_and_replaced(device: Device, tmp_path: Path) -> None:
    art = _artifact(tmp_path, "weights.npz")
    remote = DeviceCache(device).ensure(art)
    # flip bytes in the cached file ON the device (same size: only the sha256 can tell)
    device.shell(f"printf 'XXXX' | dd of={remote} bs=1 seek=1000 conv=notrunc 2>/dev/null").check("corrupt")
    assert device.sha256(remote) != sha256_file(art)
    cache = DeviceCache(device)
    assert cache.ensure(art) == remote
    assert cache.stats.repaired == 1 and cache.stats.pushes == 1
    assert device.sha256(remote) == sha256_file(art)


def test_truncated_cached_copy_is_replaced(device: Device, tmp_path: Path) -> None:
    art = _artifact(tmp_path, "stage.onnx")
    remote = DeviceCache(device).ensure(art)
    device.shell(f"printf 'short' > {remote}").check("truncate")
    cache = DeviceCache(device)
    cache.ensure(art)
    assert cache.stats.repaired == 1
    assert device.sha256(remote) == sha256_file(art)


def test_wrong_claimed_sha256_never_lands(device: Device, tmp_path: Path) -> None:
    art = _artifact(tmp_path, "a.bin", 1000)
    liar = "0" * 64
    cache = DeviceCache(device)
    with pytest.raises(TransferError, match="sha256 on device"):
        cache.ensure(art, sha256=liar)
    assert not device.exists(cache.path_for(liar))


def test_path_for_rejects_non_digests(device: Device) -> None:
    with pytest.raises(ValueError, match="sha256"):
        DeviceCache(device).path_for("../../etc/passwd")
