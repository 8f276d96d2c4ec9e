"""CIFAR-10 from the official python tarball or from the JPEG tarball in ../shared/data.

Trust decision for the official tarball (cifar-10-python.tar.gz): its batches are Python
pickles. They are a public, documented format that the user downloads themselves (never
something a device sends), and we unpickle them with a restricted Unpickler whose
``find_class`` admits only numpy's array reconstruction (``_reconstruct``, ``ndarray``,
``dtype``) and ``_codecs.encode`` (str -> bytes, used by Python 3 protocol-2 pickles); any other global (os.system, builtins.eval, ...) is refused with a HostError.
Device data is never unpickled anywhere in fedblocks.
"""

from __future__ import annotations

import codecs
import gzip
import io
import logging
import os
import pickle
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedblocks.host.data._progress import data_progress
from fedblocks.host.data.dataset import (
    DataMissingError,
    Dataset,
    cache_dir,
    normalise_images,
    sha256_file,
    subset_indices,
)
from fedblocks.host.errors import HostError

CLASS_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# The usual CIFAR-10 training-set statistics (per channel, on x/255).
MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

PYTHON_TARBALL = "cifar-10-python.tar.gz"
PYTHON_DIR = "cifar-10-batches-py"
JPEG_TARBALL = "cifar10-jpg.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_BYTES = 3 * 32 * 32

log = logging.getLogger(__name__)
_JPEG_MEMBER = re.compile(r"^(?:\./)?(train|test)/([a-z]+)/(\d+)\.jpg$")
_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array-unpickling function, whatever its module
# The only globals an official (or re-saved) CIFAR batch pickle may reference. _codecs.encode
# is how Python 3 writes bytes at protocol 2 (it only turns a str into bytes).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): codecs.encode,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


@dataclass(frozen=True)
class RawSplits:
    """Undecoded CIFAR arrays: uint8 images (layout given) and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    layout: str  # "NCHW" (python batches, decoded JPEGs) or "NHWC"


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return allowed


def _unpickle_batch(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any malformed pickle is a bad file, reported in one line
        raise HostError(f"{where}: not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(obj, dict):
        raise HostError(f"{where}: not a CIFAR-10 python batch (top level is {type(obj).__name__})")
    return {(k.decode("latin-1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _batch_arrays(batch: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise HostError(f"{where}: 'data' must be a uint8 array of shape (N, {IMAGE_BYTES})")
    y = np.asarray(labels, dtype=np.int64) if isinstance(labels, list | np.ndarray) else None
    if y is None or y.shape != (data.shape[0],):
        raise HostError(f"{where}: 'labels' must be a list of {data.shape[0]} integers")
    if y.size and (y.min() < 0 or y.max() >= len(CLASS_NAMES)):
        raise HostError(f"{where}: labels outside 0..{len(CLASS_NAMES) - 1}")
    return data.reshape(-1, 3, 32, 32), y


def read_python_batches(source: Path) -> RawSplits:
    """The official format: a .tar.gz (or its extracted cifar-10-batches-py/ folder)."""
    blobs: dict[str, bytes] = {}
    wanted = {*TRAIN_BATCHES, TEST_BATCH}
    if source.is_dir():
        for name in wanted:
            if (source / name).is_file():
                blobs[name] = (source / name).read_bytes()
    else:
        try:
            with tarfile.open(source, "r:gz") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in wanted:
                        fh = tar.extractfile(member)
                        if fh is not None:
                            blobs[base] = fh.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise HostError(f"{source}: cannot read the CIFAR-10 tarball ({exc})") from None
    missing = sorted(wanted - blobs.keys())
    if missing:
        raise HostError(f"{source}: missing CIFAR-10 batches {', '.join(missing)}")
    train = [_batch_arrays(_unpickle_batch(blobs[n], f"{source}:{n}"), f"{source}:{n}") for n in TRAIN_BATCHES]
    x_test, y_test = _batch_arrays(_unpickle_batch(blobs[TEST_BATCH], f"{source}:{TEST_BATCH}"), f"{source}:{TEST_BATCH}")
    return RawSplits(
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
        layout="NCHW",
    )


@dataclass(frozen=True)
class _JpegMember:
    split: str
    label: int
    number: int
    name: str
    offset: int  # of the file's bytes in the decompressed tar
    size: int


def _ustar_index(raw: bytes, where: Path) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of the regular files in an uncompressed tar, parsed directly.

    tarfile spends ~80 us of Python per header (5 s for this tarball); plain ustar headers
    parse in a few us. Returns None for anything beyond plain ustar/v7 (pax, GNU long
    names, base-256 sizes) so the caller falls back to tarfile.
    """
    out: list[tuple[str, int, int]] = []
    off, n = 0, len(raw)
    while off + 512 <= n:
        header = raw[off:off + 512]
        if header[0] == 0:  # end-of-archive block
            break
        try:
            checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size_field = header[124:136]
            if size_field[0] & 0x80:
                return None
            size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise HostError(f"{where}: corrupt tar header at byte {off}") from None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise HostError(f"{where}: tar header checksum mismatch at byte {off}")
        kind = header[156:157]
        if kind in (b"x", b"g", b"L", b"K", b"S"):
            return None
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        if kind in (b"0", b"\0"):
            if off + 512 + size > n:
                raise HostError(f"{where}: tar member {name!r} is truncated")
            out.append((name.decode("utf-8", "replace"), off + 512, size))
        off += 512 + (size + 511) // 512 * 512
    return out


def _read_jpeg_tarball(path: Path) -> tuple[bytes, list[_JpegMember]]:
    """The decompressed tar and its JPEG members sorted by (split, class, number)."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise HostError(f"{path}: cannot read the CIFAR-10 JPEG tarball ({exc})") from None
    index = _ustar_index(raw, path)
    if index is None:
        try:
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                index = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
        except tarfile.TarError as exc:
            raise HostError(f"{path}: cannot read the CIFAR-10 JPEG tarball ({exc})") from None
    members: list[_JpegMember] = []
    for name, offset, size in index:
        match = _JPEG_MEMBER.match(name)
        if match is None or match.group(2) not in CLASS_NAMES:
            raise HostError(f"{path}: unexpected member '{name}' (want train|test/<class>/NNNN.jpg)")
        split, cls, number = match.groups()
        members.append(_JpegMember(split, CLASS_NAMES.index(cls), int(number), name, offset, size))
    members.sort(key=lambda m: (m.split, m.label, m.number))
    return raw, members


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            arr = np.asarray(rgb, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for corrupt files
        raise HostError(f"{where}: cannot decode JPEG ({exc})") from None
    if arr.shape != (32, 32, 3):
        raise HostError(f"{where}: expected a 32x32 RGB image, got shape {arr.shape}")
    return arr


def decode_jpeg_tarball(
    path: Path, limit_train: int | None = None, limit_test: int | None = None
) -> RawSplits:
    """Decode train|test/<class>/NNNN.jpg into uint8 NHWC arrays, ordered by (class, number).

    With limits, only the chosen subset is decoded (the same subset as limiting a full load).
    """
    raw, members = _read_jpeg_tarball(path)
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    chosen: dict[str, list[_JpegMember]] = {}
    for split, limit in (("train", limit_train), ("test", limit_test)):
        in_split = [m for m in members if m.split == split]
        keep = subset_indices(len(in_split), limit)
        chosen[split] = in_split if keep is None else [in_split[i] for i in keep]
    with data_progress() as progress:
        task = progress.add_task(f"decoding {path.name}", total=sum(len(c) for c in chosen.values()))
        for split, picked in chosen.items():
            out = np.empty((len(picked), 32, 32, 3), dtype=np.uint8)
            for i, m in enumerate(picked):
                out[i] = _decode_jpeg(raw[m.offset:m.offset + m.size], f"{path}:{m.name}")
                if i % 256 == 255:
                    progress.advance(task, 256)
            progress.advance(task, len(picked) % 256)
            images[split] = np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # NCHW: cheap to normalise
            labels[split] = np.array([m.label for m in picked], dtype=np.int64)
    return RawSplits(images["train"], labels["train"], images["test"], labels["test"], layout="NCHW")


def _jpeg_cache_path(tarball_sha256: str) -> Path:
    # v2: uint8 NCHW arrays (v1 held NHWC)
    return cache_dir() / "datasets" / f"cifar10-jpg-v2-{tarball_sha256[:32]}.npz"


def _valid_cache(raw: RawSplits) -> bool:
    for x, y in ((raw.x_train, raw.y_train), (raw.x_test, raw.y_test)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, 32, 32) or y.dtype != np.int64:
            return False
        if y.shape != (x.shape[0],) or (y.size and (y.min() < 0 or y.max() >= len(CLASS_NAMES))):
            return False
    return True


def load_jpeg_cached(path: Path, limit_train: int | None, limit_test: int | None) -> tuple[RawSplits, str]:
    """Decoded JPEG arrays, cached as .npz keyed by the tarball's sha256. Returns (splits, note)."""
    cache = _jpeg_cache_path(sha256_file(path))
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                raw = RawSplits(z["x_train"], z["y_train"], z["x_test"], z["y_test"], layout="NCHW")
            if _valid_cache(raw):
                return _limit(raw, limit_train, limit_test), f"decoded arrays from cache {cache}"
        except (OSError, KeyError, ValueError, EOFError):
            pass
        log.warning("ignoring unreadable cache %s; decoding again", cache)
        cache.unlink(missing_ok=True)
    if limit_train is not None or limit_test is not None:
        return decode_jpeg_tarball(path, limit_train, limit_test), "decoded subset (no cache written)"
    start = time.perf_counter()
    raw = decode_jpeg_tarball(path)
    seconds = time.perf_counter() - start
    tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.tmp.npz")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, x_train=raw.x_train, y_train=raw.y_train, x_test=raw.x_test, y_test=raw.y_test)
        tmp.replace(cache)
    except OSError as exc:  # a read-only or full cache dir costs speed, not the run
        tmp.unlink(missing_ok=True)
        log.warning("could not write the CIFAR-10 cache %s (%s)", cache, exc.strerror or exc)
        return raw, f"decoded in {seconds:.1f} s (cache not written: {exc.strerror or exc})"
    return raw, f"decoded in {seconds:.1f} s, cached at {cache}"


def _limit(raw: RawSplits, limit_train: int | None, limit_test: int | None) -> RawSplits:
    tr = subset_indices(raw.y_train.shape[0], limit_train)
    te = subset_indices(raw.y_test.shape[0], limit_test)
    return RawSplits(
        raw.x_train if tr is None else raw.x_train[tr],
        raw.y_train if tr is None else raw.y_train[tr],
        raw.x_test if te is None else raw.x_test[te],
        raw.y_test if te is None else raw.y_test[te],
        raw.layout,
    )


def find_cifar10(data_dir: Path) -> Path:
    for candidate in (data_dir / PYTHON_TARBALL, data_dir / PYTHON_DIR, data_dir / JPEG_TARBALL):
        if candidate.exists():
            return candidate
    raise DataMissingError(
        f"dataset cifar10: expected {PYTHON_TARBALL} (official, https://www.cs.toronto.edu/~kriz/cifar.html) "
        f"or {JPEG_TARBALL} in {data_dir}; put one there, or point $FEDBLOCKS_DATA or the config's dataset.data_dir at its folder"
    )


def load_cifar10(data_dir: Path, limit_train: int | None = None, limit_test: int | None = None) -> Dataset:
    source = find_cifar10(data_dir)
    if source.name == JPEG_TARBALL:
        raw, note = load_jpeg_cached(source, limit_train, limit_test)
    else:
        raw, note = _limit(read_python_batches(source), limit_train, limit_test), "official python batches"
    return Dataset(
        name="cifar10",
        x_train=normalise_images(raw.x_train, MEAN, STD, raw.layout),
        y_train=raw.y_train,
        x_test=normalise_images(raw.x_test, MEAN, STD, raw.layout),
        y_test=raw.y_test,
        num_classes=10,
        input_shape=(3, 32, 32),
        class_names=CLASS_NAMES,
        source=str(source),
        notes={"load": note},
    )
