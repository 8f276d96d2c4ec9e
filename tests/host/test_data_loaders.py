"""Dataset readers: real files from ../shared/data (skipped when absent) and synthetic files
built here in each format (official CIFAR python batches, idx.gz, WAV tarball, h5)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import time
import wave
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedblocks.host.data import (
    DataMissingError,
    cifar10,
    fashion_mnist,
    fsdd,
    load_configured_dataset,
    load_dataset,
    resolve_data_dir,
    shakespeare,
)
from fedblocks.host.errors import HostError

DATA = resolve_data_dir(None)
CIFAR_JPG = DATA / "cifar10-jpg.tar.gz"
FSDD = DATA / "fsdd.tar.gz"
SHAKESPEARE = DATA / "shakespeare_train.h5"
needs_cifar = pytest.mark.skipif(not CIFAR_JPG.is_file(), reason=f"needs {CIFAR_JPG} (shared data folder absent)")
needs_fsdd = pytest.mark.skipif(not FSDD.is_file(), reason=f"needs {FSDD} (shared data folder absent)")
needs_shakespeare = pytest.mark.skipif(
    not SHAKESPEARE.is_file(), reason=f"needs {SHAKESPEARE} (shared data folder absent)"
)
DEBIAN_FMNIST = fashion_mnist.SYSTEM_DIR / "train-images-idx3-ubyte.gz"
needs_debian_fmnist = pytest.mark.skipif(
    not DEBIAN_FMNIST.is_file(), reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
)


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDBLOCKS_CACHE", str(cache))
    return cache


def _check_common(ds, n_classes: int) -> None:
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.x_train.shape[1:] == ds.input_shape == ds.x_test.shape[1:]
    assert ds.x_train.shape[0] == ds.y_train.shape[0] and ds.x_test.shape[0] == ds.y_test.shape[0]
    assert ds.num_classes == n_classes == len(ds.class_names)
    assert ds.y_train.min() >= 0 and ds.y_train.max() < n_classes
    assert ds.y_test.min() >= 0 and ds.y_test.max() < n_classes


# ---------------------------------------------------------------------------- CIFAR-10


@needs_cifar
def test_cifar10_jpeg_subset_shapes_and_balanced_test_split(private_cache: Path) -> None:
    _, members = cifar10._read_jpeg_tarball(CIFAR_JPG)
    test_labels = np.array([m.label for m in members if m.split == "test"])
    assert len(members) == 60000 and np.bincount(test_labels).tolist() == [1000] * 10
    ds = load_dataset("cifar10", limit_train=300, limit_test=1000)
    _check_common(ds, 10)
    assert ds.x_train.shape == (300, 3, 32, 32) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (1000, 3, 32, 32)
    assert np.all(np.bincount(ds.y_test, minlength=10) > 50)  # a random subset covers every class
    # normalised with the CIFAR constants: roughly zero mean, unit spread per channel
    mean = ds.x_test.astype(np.float64).mean(axis=(0, 2, 3))
    std = ds.x_test.astype(np.float64).std(axis=(0, 2, 3))
    assert np.all(np.abs(mean) < 0.15) and np.all((std > 0.85) & (std < 1.15))
    assert ds.natural_clients is None and ds.source.endswith("cifar10-jpg.tar.gz")
    assert not list(private_cache.rglob("*.npz")), "a limited load must not write the full-decode cache"
    again = load_dataset("cifar10", limit_train=300, limit_test=10)
    np.testing.assert_array_equal(again.x_train, ds.x_train)  # the same fixed subset every time


@needs_cifar
@pytest.mark.slow
def test_cifar10_full_decode_then_cached_load(private_cache: Path) -> None:
    t0 = time.perf_counter()
    full = load_dataset("cifar10")
    first_s = time.perf_counter() - t0
    assert full.x_train.shape == (50000, 3, 32, 32) and full.x_test.shape == (10000, 3, 32, 32)
    assert np.bincount(full.y_train).tolist() == [5000] * 10
    assert "cached at" in full.notes["load"]
    t0 = time.perf_counter()
    cached = load_dataset("cifar10")
    second_s = time.perf_counter() - t0
    assert "from cache" in cached.notes["load"]
    np.testing.assert_array_equal(cached.x_train[::997], full.x_train[::997])
    np.testing.assert_array_equal(cached.y_train, full.y_train)
    # a limited load from the cache is the very subset a limited decode gives
    from_cache = load_dataset("cifar10", limit_train=123, limit_test=45)
    decoded = cifar10.decode_jpeg_tarball(CIFAR_JPG, 123, 45)
    np.testing.assert_array_equal(
        from_cache.x_train, cifar10.normalise_images(decoded.x_train, cifar10.MEAN, cifar10.STD, "NCHW")
    )
    np.testing.assert_array_equal(from_cache.y_test, decoded.y_test)
    print(f"cifar10 JPEG: first load {first_s:.1f} s ({full.notes['load']}), cached load {second_s:.2f} s")
    assert first_s < 120 and second_s < 10


def _write_jpeg_tarball(path: Path, pax: bool = False) -> dict[str, np.ndarray]:
    """A miniature cifar10-jpg.tar.gz: train|test/<class>/NNNN.jpg, members in shuffled order.

    Returns each member's pixels as PIL decodes them.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    entries = [(split, cls, n) for split, per in (("train", 3), ("test", 2))
               for cls in ("cat", "airplane", "truck") for n in range(per)]
    rng.shuffle(entries)
    images = {}
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for split, cls, n in entries:
            img = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # smooth blocks
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            name = f"{split}/{cls}/{n:04d}.jpg"
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            if pax:
                info.pax_headers = {"comment": "forces a pax header"}
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            images[name] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))  # PIL's own decode
    return images


@pytest.mark.parametrize("pax", [False, True])
def test_cifar10_jpeg_tarball_decode_order_and_cache(tmp_path: Path, private_cache: Path, pax: bool) -> None:
    images = _write_jpeg_tarball(tmp_path / "cifar10-jpg.tar.gz", pax=pax)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (9, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    # sorted by (class index, number): airplane=0, cat=3, truck=9
    assert ds.y_train.tolist() == [0, 0, 0, 3, 3, 3, 9, 9, 9] and ds.y_test.tolist() == [0, 0, 3, 3, 9, 9]
    pixels = ds.x_train[4].transpose(1, 2, 0) * np.array(cifar10.STD) + np.array(cifar10.MEAN)
    np.testing.assert_allclose(pixels * 255, images["train/cat/0001.jpg"], atol=1e-3)
    (cache,) = private_cache.rglob("*.npz")
    assert "cached at" in ds.notes["load"]
    cached = load_dataset("cifar10", data_dir=tmp_path)
    assert "from cache" in cached.notes["load"]
    np.testing.assert_array_equal(cached.x_train, ds.x_train)
    cache.write_bytes(b"torn")  # a damaged cache is replaced, never trusted
    again = load_dataset("cifar10", data_dir=tmp_path)
    assert "cached at" in again.notes["load"]
    np.testing.assert_array_equal(again.x_test, ds.x_test)


def test_cifar10_jpeg_tarball_rejects_foreign_members(tmp_path: Path, private_cache: Path) -> None:
    with tarfile.open(tmp_path / "cifar10-jpg.tar.gz", "w:gz") as tar:
        _add(tar, "train/unicorn/0001.jpg", b"x")
    with pytest.raises(HostError, match=r"unexpected member 'train/unicorn/0001.jpg'"):
        load_dataset("cifar10", data_dir=tmp_path)
    with tarfile.open(tmp_path / "cifar10-jpg.tar.gz", "w:gz") as tar:
        _add(tar, "train/cat/0001.jpg", b"not a jpeg")
    with pytest.raises(HostError, match=r"train/cat/0001.jpg: cannot decode JPEG"):
        load_dataset("cifar10", data_dir=tmp_path)


def _official_batch(n: int, seed: int, label: bytes) -> tuple[dict[bytes, object], np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    batch = {b"batch_label": label, b"labels": labels, b"data": data,
             b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}
    return batch, data, labels


def _py2_pickle(obj: object) -> bytes:
    """Protocol 2 as the official files use it, naming numpy's module as numpy 1.x did."""
    return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write_official_tarball(path: Path, per_batch: int = 7, test_payload: bytes | None = None):
    """cifar-10-python.tar.gz as the CIFAR authors ship it: protocol-2 pickles of dicts with bytes keys."""
    train_data, train_labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            batch, data, labels = _official_batch(per_batch, i, f"training batch {i} of 5".encode())
            _add(tar, f"cifar-10-batches-py/data_batch_{i}", _py2_pickle(batch))
            train_data.append(data)
            train_labels += labels
        batch, test_data, test_labels = _official_batch(5, 99, b"testing batch 1 of 1")
        _add(tar, "cifar-10-batches-py/test_batch", test_payload or _py2_pickle(batch))
        meta = {b"label_names": [n.encode() for n in cifar10.CLASS_NAMES], b"num_vis": 3072}
        _add(tar, "cifar-10-batches-py/batches.meta", _py2_pickle(meta))
    return np.concatenate(train_data), np.array(train_labels), test_data, np.array(test_labels)


def test_cifar10_official_python_tarball(tmp_path: Path) -> None:
    x_raw, y, _, y_test = _write_official_tarball(tmp_path / "cifar-10-python.tar.gz")
    (tmp_path / "cifar10-jpg.tar.gz").write_bytes(b"not used: the official tarball wins")
    ds = load_dataset("cifar10", data_dir=tmp_path)
    _check_common(ds, 10)
    assert ds.source.endswith("cifar-10-python.tar.gz")
    assert ds.x_train.shape == (35, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(ds.y_train, y)
    np.testing.assert_array_equal(ds.y_test, y_test)
    # row layout: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major
    for n, c, h, w in [(0, 0, 0, 0), (3, 1, 5, 7), (34, 2, 31, 31)]:
        expected = (x_raw[n, c * 1024 + h * 32 + w] / 255.0 - cifar10.MEAN[c]) / cifar10.STD[c]
        assert ds.x_train[n, c, h, w] == pytest.approx(expected, abs=1e-5)
    limited = load_dataset("cifar10", data_dir=tmp_path, limit_train=10, limit_test=2)
    assert limited.x_train.shape[0] == 10 and limited.x_test.shape[0] == 2
    # the extracted folder works too
    extracted = tmp_path / "extracted"
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        tar.extractall(extracted, filter="data")
    from_dir = load_dataset("cifar10", data_dir=extracted)
    assert from_dir.source.endswith("cifar-10-batches-py")
    np.testing.assert_array_equal(from_dir.x_train, ds.x_train)


def test_cifar10_python_batches_refuse_foreign_globals(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
    _write_official_tarball(tmp_path / "cifar-10-python.tar.gz", test_payload=evil)
    with pytest.raises(HostError, match=r"refusing global (posix|os)\.system"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar10_bad_batch_contents_are_one_line_errors(tmp_path: Path) -> None:
    bad = pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, protocol=2)
    _write_official_tarball(tmp_path / "cifar-10-python.tar.gz", test_payload=bad)
    with pytest.raises(HostError, match=r"test_batch: 'data' must be a uint8 array of shape \(N, 3072\)"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_missing_data_names_the_file_and_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and "cifar10-jpg.tar.gz" in message and str(tmp_path) in message
    assert "\n" not in message
    for name, expected in (("fsdd", "fsdd.tar.gz"), ("shakespeare", "shakespeare_train.h5")):
        with pytest.raises(DataMissingError, match=expected):
            load_dataset(name, data_dir=tmp_path)
    with pytest.raises(HostError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(HostError, match="limit_train must be a positive integer"):
        load_dataset("fsdd", data_dir=tmp_path, limit_train=0)


def test_data_dir_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBLOCKS_DATA", str(tmp_path / "from-env"))
    assert resolve_data_dir(None) == tmp_path / "from-env"
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("FEDBLOCKS_DATA")
    assert resolve_data_dir(None).parts[-2:] == ("shared", "data")


# ---------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _write_fashion(folder: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in fashion_mnist.FILES.items():
        _write_idx(folder / f"{name}.gz", arrays[key])
    return arrays


def test_fashion_mnist_idx_reader(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path / "fashion-mnist")
    # the idx layout: labels start at byte 8, images at byte 16
    raw = gzip.open(tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte.gz").read()
    assert raw[8:] == arrays["y_train"].tobytes()
    ds = load_dataset("fashion_mnist", data_dir=tmp_path)
    _check_common(ds, 10)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == np.float32
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"].astype(np.int64))
    expected = (arrays["x_train"][4, 10, 20] / 255.0 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
    assert ds.x_train[4, 0, 10, 20] == pytest.approx(expected, abs=1e-5)


def test_fashion_mnist_rejects_bad_idx(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 99) + b"\x01\x02")
    with pytest.raises(HostError, match=r"idx header says \(99,\) \(99 bytes\) but the file holds 2"):
        load_dataset("fashion_mnist", data_dir=tmp_path)
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00")
    with pytest.raises(HostError, match="not an unsigned-byte idx file"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


def test_fallback_dataset_when_the_first_is_absent(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    ds = load_configured_dataset("cifar10", "fashion_mnist", data_dir=tmp_path)
    assert ds.name == "fashion_mnist" and "cifar10" in ds.notes["fallback_from"]
    with pytest.raises(DataMissingError):
        load_configured_dataset("fsdd", None, data_dir=tmp_path)


@needs_debian_fmnist
def test_fashion_mnist_real_debian_files() -> None:
    ds = fashion_mnist.load_fashion_mnist([fashion_mnist.SYSTEM_DIR], limit_test=None)
    _check_common(ds, 10)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert abs(float(ds.x_train[:5000].mean())) < 0.1


# ---------------------------------------------------------------------------- FSDD


def _wav_bytes(signal: np.ndarray, rate: int = 8000, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes((signal * 20000).astype("<i2").tobytes() if width == 2 else bytes(len(signal)))
    return buf.getvalue()


def test_fsdd_synthetic_tarball(tmp_path: Path) -> None:
    t = np.arange(4000) / 8000
    with tarfile.open(tmp_path / "fsdd.tar.gz", "w:gz") as tar:
        for digit in (3, 7):
            for speaker in ("ann", "bob"):
                for i in (0, 1, 5, 6, 7):
                    tone = np.sin(2 * np.pi * (300 + 100 * digit) * t)
                    _add(tar, f"recordings/{digit}_{speaker}_{i}.wav", _wav_bytes(tone))
    ds = load_dataset("fsdd", data_dir=tmp_path)
    _check_common(ds, 10)
    assert ds.x_train.shape == (12, 1, 32, 32) and ds.x_test.shape == (8, 1, 32, 32)
    assert ds.natural_client_names == ["ann", "bob"]
    assert [len(c) for c in ds.natural_clients] == [6, 6]
    assert sorted(set(ds.y_test.tolist())) == [3, 7]
    # the tone's energy lands in the mel band around its frequency: different digits differ
    assert not np.allclose(ds.x_train[ds.y_train == 3][0], ds.x_train[ds.y_train == 7][0])
    limited = load_dataset("fsdd", data_dir=tmp_path, limit_train=5)
    assert sum(len(c) for c in limited.natural_clients) == 5


def test_fsdd_rejects_wrong_sample_rate(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "fsdd.tar.gz", "w:gz") as tar:
        _add(tar, "recordings/1_ann_9.wav", _wav_bytes(np.zeros(100), rate=16000))
    with pytest.raises(HostError, match="expected mono 16-bit 8000 Hz, got 1 ch 16-bit 16000 Hz"):
        load_dataset("fsdd", data_dir=tmp_path)


def test_log_mel_shape_and_filterbank() -> None:
    fb = fsdd.mel_filterbank()
    assert fb.shape == (32, 129) and np.all(fb >= 0) and np.all(fb.max(axis=1) > 0.5)
    feats = fsdd.log_mel(np.zeros(20000))
    assert feats.shape == (1, 32, 32) and feats.dtype == np.float32


@needs_fsdd
def test_fsdd_real_speakers_are_natural_clients() -> None:
    ds = load_dataset("fsdd")
    _check_common(ds, 10)
    assert ds.x_train.shape == (2700, 1, 32, 32) and ds.x_test.shape == (300, 1, 32, 32)
    assert np.bincount(ds.y_test).tolist() == [30] * 10
    assert ds.natural_clients is not None and len(ds.natural_clients) == 6
    assert ds.natural_client_names == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    joined = np.concatenate(ds.natural_clients)
    assert np.array_equal(np.sort(joined), np.arange(2700))  # disjoint and complete
    assert abs(float(ds.x_train.mean())) < 0.2 and 0.7 < float(ds.x_train.std()) < 1.3


# ---------------------------------------------------------------------------- Shakespeare


def test_shakespeare_vocabulary_and_windows() -> None:
    assert len(shakespeare.LEAF_LETTERS) == 80 and shakespeare.VOCAB_SIZE == 82
    ids = shakespeare.encode("To be, or not\n€")
    assert ids[-1] == shakespeare.OOV_ID and shakespeare.decode(ids[:-1]) == "To be, or not\n"
    text = "".join(chr(65 + i % 26) for i in range(200))
    x, y = shakespeare.snippet_samples(shakespeare.encode(text), stride=80)
    assert x.shape == (3, 80) and y.shape == (3,)  # ceil(199 / 80)
    assert shakespeare.decode(y) == text[39] + text[119] + text[199]
    assert shakespeare.decode(x[-1]) == text[119:199]
    assert np.all(x[0, :41] == shakespeare.PAD_ID) and shakespeare.decode(x[0]) == text[:39]
    assert shakespeare.snippet_samples(shakespeare.encode("a"))[0].shape == (0, 80)


def test_shakespeare_synthetic_h5(tmp_path: Path) -> None:
    for fname in ("shakespeare_train.h5", "shakespeare_test.h5"):
        with h5py.File(tmp_path / fname, "w") as f:
            f.create_dataset("examples/HAMLET/snippets", data=np.array([b"To be, or not to be", b"x"]))
            f.create_dataset("examples/MUTE/snippets", data=np.array([b""]))
            f.create_dataset("examples/OPHELIA/snippets", data=np.array([b"O, what a noble mind"]))
    ds = load_dataset("shakespeare", data_dir=tmp_path)
    _check_common(ds, 82)
    assert ds.natural_client_names == ["HAMLET", "OPHELIA"]  # MUTE yields no sample
    assert [len(c) for c in ds.natural_clients] == [1, 1]
    assert shakespeare.decode(ds.y_train) == "ed"
    limited = load_dataset("shakespeare", data_dir=tmp_path, limit_train=1)
    assert limited.num_train == 1 and sum(len(c) for c in limited.natural_clients) == 1


@needs_shakespeare
def test_shakespeare_real_roles_are_natural_clients() -> None:
    ds = load_dataset("shakespeare")
    _check_common(ds, 82)
    assert ds.x_train.dtype == np.int64 and ds.input_shape == (80,)
    assert ds.natural_clients is not None and len(ds.natural_clients) == 715
    assert ds.num_train == sum(len(c) for c in ds.natural_clients) > 30000
    assert ds.y_train.min() >= 1  # padding is never a label
    assert ds.x_test.shape[0] > 5000
