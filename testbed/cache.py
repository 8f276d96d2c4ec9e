"""Content-addressed artifact cache on a device: ``<root>/<sha256>``.

``ensure(local)`` pushes a file only if the device does not already hold a good copy,
so an artifact shared by many rounds (or many stages) crosses the link once.

Trade-off (decided): the first time a DeviceCache instance meets a hash it checks the
device's copy for real (size + on-device sha256, ~0.1-0.5 s for 20 MB on a phone) and
remembers the result in memory for the life of the instance; later ensures of that
hash cost nothing. A persistent on-device index would skip the hashing but would trust
files that another process, a full disk or a bad flash may have changed since; the
cache never trusts the device more than once per session. Keep one DeviceCache per
device for a whole run to benefit. A corrupt cached file is deleted and pushed again.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .device import Device, ProgressCallback, sha256_file

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class CacheStats:
    pushes: int = 0          # files pushed (misses)
    hits: int = 0            # ensures answered without a push
    bytes_pushed: int = 0
    repaired: int = 0        # cached copies found corrupt and replaced


class DeviceCache:
    def __init__(self, device: Device, root: str | None = None) -> None:
        self.device = device
        self.root = (root or f"{device.base_dir}/cache").rstrip("/")
        self.stats = CacheStats()
        self._verified: set[str] = set()
        self._lock = threading.Lock()

    def path_for(self, sha256: str) -> str:
        if not _SHA256_RE.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return f"{self.root}/{sha256}"

    def contains(self, sha256: str, size: int | None = None) -> bool:
        """Whether the device holds a verified copy (checks the device once per instance)."""
        remote = self.path_for(sha256)
        if sha256 in self._verified:
            return True
        have = self.device.size(remote)
        if have is None:
            return False
        if (size is not None and have != size) or self.device.sha256(remote) != sha256:
            self.device.remove(remote)
            self.stats.repaired += 1
            return False
        self._verified.add(sha256)
        return True

    def ensure(self, local: Path, sha256: str | None = None, progress: ProgressCallback | None = None) -> str:
        """The device path of ``local``'s content, pushing it only if the device lacks it.

        ``sha256``: the file's digest when the caller already knows it (e.g. from a
        manifest); it must be the file's real digest, or the verified push fails.
        """
        local = Path(local)
        digest = (sha256 or sha256_file(local)).lower()
        remote = self.path_for(digest)
        size = local.stat().st_size
        with self._lock:
            if self.contains(digest, size):
                self.stats.hits += 1
                if progress is not None:
                    progress(size, size)
                return remote
            self.device.push(local, remote, progress, sha256=digest)  # verified, atomic rename
            self._verified.add(digest)
            self.stats.pushes += 1
            self.stats.bytes_pushed += size
            return remote

    def forget(self) -> None:
        """Drop the in-memory verification memo (the next ensure re-checks the device)."""
        with self._lock:
            self._verified.clear()
