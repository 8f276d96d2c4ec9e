"""Shared export fixtures: ResNet-8, every stage, every engine, exported once.

The export goes to a persistent temporary directory (FEDBLOCKS_TEST_EXPORT_DIR, or
<tmp>/fedblocks-test-exports-<uid>) through the exporter's own content-addressed
cache: the cache key covers the export sources and package versions, so a later
session reuses the artifacts only if nothing that shapes them changed. A cold
ExecuTorch export of all ResNet-8 stages takes minutes on a busy 2-core box; warm,
the fixture takes seconds.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from fedblocks.export.pipeline import ExportSpec

RESNET8 = ExportSpec(model="resnet8", num_classes=10, input_shape=(3, 32, 32), batch_size=4,
                     engines=("ort", "executorch", "torch"), seed=0)
RESNET8_STAGES = ("shrink-3", "shrink-2", "grow-1", "grow-2", "grow-3", "full")


def export_cache_dir(name: str) -> Path:
    root = os.environ.get("FEDBLOCKS_TEST_EXPORT_DIR")
    base = Path(root) if root else Path(tempfile.gettempdir()) / f"fedblocks-test-exports-{os.getuid()}"
    return base / name


@pytest.fixture(scope="session")
def resnet8_export() -> Path:
    """Directory holding manifest.json + objects/ for RESNET8."""
    from fedblocks.export.pipeline import export_model

    out = export_cache_dir("resnet8-b4")
    export_model(RESNET8, out)
    return out
