"""Content-addressed shards: byte-deterministic .npz, named by sha256, written once."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedblocks.host.data import read_shard, write_shard
from fedblocks.host.errors import HostError


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((16, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, 16).astype(np.int64)


def test_same_arrays_same_bytes_and_name(tmp_path: Path) -> None:
    x, y = _data()
    a = write_shard(x, y, tmp_path / "a")
    b = write_shard(x.copy(), y.copy(), tmp_path / "b")
    assert a.sha256 == b.sha256 and a.num_samples == 16
    assert a.path.name == f"{a.sha256}.npz"
    assert a.path.read_bytes() == b.path.read_bytes()
    assert hashlib.sha256(a.path.read_bytes()).hexdigest() == a.sha256
    # fixed zip metadata: no timestamps from the clock
    with zipfile.ZipFile(a.path) as zf:
        assert [i.filename for i in zf.infolist()] == ["x.npy", "y.npy"]
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())
    other = write_shard(*_data(1), tmp_path / "a")
    assert other.sha256 != a.sha256


def test_existing_shard_is_reused(tmp_path: Path) -> None:
    x, y = _data()
    first = write_shard(x, y, tmp_path)
    stamp = first.path.stat().st_mtime_ns
    again = write_shard(x, y, tmp_path)
    assert again == first and first.path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name]  # no temp files left


def test_extra_arrays_and_round_trip(tmp_path: Path) -> None:
    x, y = _data()
    teacher = np.arange(160, dtype=np.float32).reshape(16, 10)
    ref = write_shard(x, y, tmp_path, extra={"teacher": teacher})
    arrays = read_shard(ref.path, ref.sha256)
    assert list(arrays) == ["x", "y", "teacher"]
    np.testing.assert_array_equal(arrays["x"], x)
    np.testing.assert_array_equal(arrays["teacher"], teacher)
    with np.load(ref.path, allow_pickle=False) as z:  # a plain .npz for any reader
        np.testing.assert_array_equal(z["y"], y)


def test_bad_shards_are_refused(tmp_path: Path) -> None:
    x, y = _data()
    with pytest.raises(HostError, match="array 'y' has shape \\(15,\\); every array needs 16 rows"):
        write_shard(x, y[:15], tmp_path)
    with pytest.raises(HostError, match="dtype object"):
        write_shard(x, y, tmp_path, extra={"meta": np.array([{}] * 16, dtype=object)})
    with pytest.raises(HostError, match="reserved or not a plain identifier"):
        write_shard(x, y, tmp_path, extra={"x": x})
    ref = write_shard(x, y, tmp_path)
    with pytest.raises(HostError, match="does not match the expected"):
        read_shard(ref.path, "0" * 64)
    (tmp_path / "junk.npz").write_bytes(b"PK not really")
    with pytest.raises(HostError, match=r"not a valid \.npz"):
        read_shard(tmp_path / "junk.npz")
