"""Content-addressed object store under ``OUT/objects``, plus the export cache index.

Every artifact file lives at ``OUT/objects/<sha256>.<ext>``; identical bytes are
stored once. ``OUT/objects/index/<key>.json`` maps a *cache key* -- the sha256 of
everything an export result depends on (model, classes, input shape, batch size,
blocks, stage, engine, optimizer, seed, package versions and the export/ sources)
-- to the objects it produced, so re-exporting an unchanged stage costs a lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from fedblocks.export.errors import ExportError
from fedblocks.export.manifest import ArtifactRef

OBJECTS_DIR = "objects"
INDEX_DIR = "index"
# Packages whose version changes what an export produces.
VERSIONED_PACKAGES = ("torch", "onnx", "onnxruntime-training-cpu", "executorch", "numpy")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions (read from metadata, so no engine gets imported)."""
    out: dict[str, str] = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# Files that cannot change what an export produces (presentation only).
_NOT_HASHED = ("cli.py",)


def source_hash() -> str:
    """sha256 over the export package's .py sources: any code change invalidates the cache."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() in _NOT_HASHED:
            continue
        digest.update(str(path.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``fields`` (sorted keys, no whitespace)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


class ObjectStore:
    """``root`` is the export directory; objects go to ``root/objects``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / OBJECTS_DIR
        self.index = self.objects / INDEX_DIR
        try:
            self.index.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"cannot write to {self.root}: {exc.strerror or exc}; choose another --out") from None
        if not os.access(self.objects, os.W_OK) or not os.access(self.index, os.W_OK):
            raise ExportError(f"cannot write to {self.objects}; choose another --out")

    def _ref(self, sha: str, ext: str) -> ArtifactRef:
        path = self.objects / f"{sha}.{ext}"
        return ArtifactRef(path=f"{OBJECTS_DIR}/{path.name}", sha256=sha, bytes=path.stat().st_size)

    def put_file(self, src: Path, ext: str) -> ArtifactRef:
        """Move ``src`` into the store under its sha256 (dropped if already there)."""
        sha = sha256_file(src)
        dest = self.objects / f"{sha}.{ext}"
        if dest.exists() and dest.stat().st_size == src.stat().st_size:
            src.unlink()
        else:
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.move(str(src), tmp)
            os.replace(tmp, dest)
        return self._ref(sha, ext)

    def put_bytes(self, data: bytes, ext: str) -> ArtifactRef:
        sha = hashlib.sha256(data).hexdigest()
        dest = self.objects / f"{sha}.{ext}"
        if not (dest.exists() and dest.stat().st_size == len(data)):
            tmp = dest.with_name(f".{dest.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        return self._ref(sha, ext)

    def path(self, ref: ArtifactRef) -> Path:
        return self.root / ref.path

    def has(self, ref: ArtifactRef) -> bool:
        """Present with the recorded size (full hashes are checked by `verify`)."""
        path = self.path(ref)
        return path.is_file() and path.stat().st_size == ref.bytes

    def verify(self, ref: ArtifactRef) -> bool:
        return self.has(ref) and sha256_file(self.path(ref)) == ref.sha256

    def get_index(self, key: str) -> dict[str, Any] | None:
        path = self.index / f"{key}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # missing or damaged entry: rebuild
        return data if isinstance(data, dict) else None

    def put_index(self, key: str, payload: Mapping[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.index, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, sort_keys=True)
        os.replace(tmp, self.index / f"{key}.json")

    @contextlib.contextmanager
    def scratch(self) -> Any:
        """A temporary directory on the same filesystem (so moves into the store are renames)."""
        path = Path(tempfile.mkdtemp(dir=self.objects, prefix=".build-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
