"""fedblocks.device_runtime: what runs ON the device (stdlib + numpy + one engine only).

Entry points: `python -m fedblocks.device_runtime run JOB.json` (or the zipapp built
by `build_runtime_pyz`). See docs/device_runtime.md and docs/formats.md.
"""

from __future__ import annotations

from pathlib import Path


def build_runtime_pyz(out: Path) -> Path:
    """Build fedblocks-runtime.pyz at `out`; returns its path (see pyz.py)."""
    from .pyz import build_runtime_pyz as build

    return build(out)
