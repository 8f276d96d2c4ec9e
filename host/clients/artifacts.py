"""Stage artifacts for phones, built with the CURRENT frozen weights.

Frozen tensors are baked into an engine artifact (device_runtime/weights.py), so a
stage that runs after earlier blocks were trained (ProFL's grow-2 after grow-1,
shrink-j after shrink-(j+1)) needs artifacts exported from the current global
weights, not from the initial ones `fedblocks export` used. The builders are the
export pipeline's own (fedblocks.export.builders); results are content-addressed in
RUN_DIR/artifacts and indexed by (stage, engine, batch size, frozen-weights hash), so
a stage whose frozen tensors did not change is built once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedblocks.host.clients.base import FileOnHost


def frozen_digest(program: Any) -> str:
    """sha256 over the stage's frozen tensors (name, shape, dtype, bytes), in name order."""
    h = hashlib.sha256()
    for spec in sorted(program.frozen_specs(), key=lambda s: s.name):
        value = program.global_state()[spec.name].detach().contiguous().numpy()
        h.update(spec.name.encode())
        h.update(str(value.shape).encode() + str(value.dtype).encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def build_stage_artifacts(program: Any, engine: str, batch_size: int, seed: int, out_dir: Path,
                          ) -> dict[str, FileOnHost]:
    """Engine files for `program` (which already holds the current global weights), cached."""
    from fedblocks.export import builders
    from fedblocks.export.objects import ObjectStore, cache_key, package_versions, source_hash

    store = ObjectStore(Path(out_dir))
    key = cache_key({"step": "host-stage-artifact", "stage": program.stage_id, "engine": engine,
                     "batch_size": batch_size, "frozen": frozen_digest(program),
                     "versions": package_versions(), "source": source_hash()})
    cached: Mapping[str, Any] | None = store.get_index(key)
    if cached is not None:
        refs = {role: (Path(out_dir) / r["path"], r["sha256"]) for role, r in cached["artifacts"].items()}
        if all(p.is_file() for p, _ in refs.values()):
            return {role: FileOnHost(p, sha) for role, (p, sha) in refs.items()}
    module = builders.builder(engine)
    module.check_available()
    example_inputs = program.example_inputs(batch_size, seed)
    with store.scratch() as workdir:
        files = module.build(program, example_inputs, workdir)
        refs_out = {role: store.put_file(files[role], ext) for role, ext in module.ROLES.items()}
    store.put_index(key, {"artifacts": {role: r.to_dict() for role, r in refs_out.items()}})
    return {role: FileOnHost(store.path(r), r.sha256) for role, r in refs_out.items()}
