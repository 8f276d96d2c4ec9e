"""Builds fedblocks-runtime.pyz: the device runtime as one zipapp.

It holds only the fedblocks.device_runtime package and a __main__; on the device it
needs Python 3.11, numpy and one engine. The archive is deterministic (sorted
entries, fixed timestamps), so its sha256 changes only when the runtime's code does
and the testbed's content-addressed push skips an unchanged runtime.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = (
    "import sys\n"
    "from fedblocks.device_runtime.cli import main\n"
    "sys.exit(main())\n"
)
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def _package_files() -> list[tuple[str, Path]]:
    root = Path(__file__).resolve().parent
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts:
            continue
        files.append((f"fedblocks/device_runtime/{rel.as_posix()}", path))
    return files


def build_runtime_pyz(out: Path) -> Path:
    """Write the zipapp to `out` (atomically) and return its path."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    entries: list[tuple[str, bytes]] = [("__main__.py", MAIN.encode()),
                                        ("fedblocks/__init__.py", b'"""fedblocks (device runtime only)."""\n')]
    entries += [(name, path.read_bytes()) for name, path in _package_files()]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(SHEBANG)
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name, data in sorted(entries):
                    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, data)
        os.chmod(tmp_name, 0o755)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out
