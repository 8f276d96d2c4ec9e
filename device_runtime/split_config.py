"""The `split` section of a SmartSplit job.json (docs/formats.md, docs/smartsplit.md).

    "split": {
      "server": {"host": "127.0.0.1", "port": 7100},   where the edge server listens (as the phone sees it)
      "token": "<32+ hex>",                             the session token the server issued for this job
      "cut": "2",
      "activation_shape": [32, 128, 16, 16],
      "footprint_bytes": 203000000,                     predicted device footprint without recompute
      "recompute_ladder": [{"units": ["blocks.0.0"], "footprint_bytes": 150000000}, ...],
      "recompute": "auto",                              auto | off | all | [unit names]
      "approach_fraction": 0.85,                        auto: act when memory passes this share of the budget
      "torch_conv": "onednn",                           torch fronts: onednn | native convolution kernels
      "connect_timeout_s": 30, "io_timeout_s": 300, "max_frame_bytes": 536870912
    }

The ladder is the export-time recompute plan (export/split.py): units in order of best
memory saved per recompute FLOP, each rung with the predicted footprint when its units
and those of every rung before it are checkpointed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .spec import StageSpec

RECOMPUTE_POLICIES = ("auto", "off", "all")
TORCH_CONV_KERNELS = ("onednn", "native")  # native: torch's own im2col convolutions, no oneDNN layout reorders
_TOKEN = re.compile(r"^[0-9a-f]{32,128}$")
_HOST = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


class SplitConfigError(ValueError):
    """The split section is malformed (the message names the field)."""


@dataclass(frozen=True)
class LadderRung:
    units: tuple[str, ...]  # checkpointed in addition to the rungs before
    footprint_bytes: int


@dataclass(frozen=True)
class SplitConfig:
    host: str
    port: int
    token: str
    cut: str
    activation_shape: tuple[int, ...]
    footprint_bytes: int | None
    ladder: tuple[LadderRung, ...]
    recompute: str | tuple[str, ...]
    approach_fraction: float = 0.85
    connect_timeout_s: float = 30.0
    io_timeout_s: float = 300.0
    max_frame_bytes: int = 512 * 1024 * 1024
    torch_conv: str = "onednn"

    def to_dict(self) -> dict[str, Any]:
        return {"server": {"host": self.host, "port": self.port}, "token": self.token, "cut": self.cut,
                "activation_shape": list(self.activation_shape), "footprint_bytes": self.footprint_bytes,
                "recompute_ladder": [{"units": list(r.units), "footprint_bytes": r.footprint_bytes}
                                     for r in self.ladder],
                "recompute": self.recompute if isinstance(self.recompute, str) else list(self.recompute),
                "approach_fraction": self.approach_fraction, "connect_timeout_s": self.connect_timeout_s,
                "io_timeout_s": self.io_timeout_s, "max_frame_bytes": self.max_frame_bytes,
                "torch_conv": self.torch_conv}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_split_config(d: Any, stage: StageSpec) -> SplitConfig:
    """Validate the section against the stage (a split_front stage whose last output is z)."""
    if not isinstance(d, dict):
        raise SplitConfigError(f"split: expected an object, got {type(d).__name__}")
    if stage.kind != "split_front":
        raise SplitConfigError(f"split: the stage must be a split_front stage, got kind '{stage.kind}'")
    server = d.get("server")
    if not isinstance(server, dict):
        raise SplitConfigError("split.server: expected an object {host, port}")
    host, port = server.get("host"), server.get("port")
    if not isinstance(host, str) or not _HOST.match(host):
        raise SplitConfigError(f"split.server.host: expected a host name or address, got {host!r}")
    if not _int(port) or not 1 <= port <= 65535:
        raise SplitConfigError(f"split.server.port: expected a TCP port 1..65535, got {port!r}")
    token = d.get("token")
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise SplitConfigError("split.token: expected 32-128 lowercase hex digits")
    cut = d.get("cut")
    if not isinstance(cut, str) or not cut:
        raise SplitConfigError(f"split.cut: expected a cut id string, got {cut!r}")
    shape = d.get("activation_shape")
    z = stage.outputs[-1]
    if z.name != "z" or not isinstance(shape, list) or tuple(shape) != z.shape:
        raise SplitConfigError(f"split.activation_shape: {shape!r} does not match the stage's output z "
                               f"{list(z.shape) if z.name == 'z' else '(missing)'}")
    footprint = d.get("footprint_bytes")
    if footprint is not None and not (_int(footprint) and footprint >= 0):
        raise SplitConfigError(f"split.footprint_bytes: expected a non-negative integer or null, got {footprint!r}")
    ladder_raw = d.get("recompute_ladder", [])
    if not isinstance(ladder_raw, list):
        raise SplitConfigError("split.recompute_ladder: expected a list")
    ladder = []
    for i, rung in enumerate(ladder_raw):
        names = rung.get("units") if isinstance(rung, dict) else None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names) or not (
                _int(rung.get("footprint_bytes")) and rung["footprint_bytes"] >= 0):
            raise SplitConfigError(f"split.recompute_ladder[{i}]: expected {{units: [str, ...], footprint_bytes: int}}")
        ladder.append(LadderRung(tuple(names), int(rung["footprint_bytes"])))
    units = [u for r in ladder for u in r.units]
    if len(set(units)) != len(units):
        raise SplitConfigError("split.recompute_ladder: a unit appears twice")
    recompute = d.get("recompute", "auto")
    if isinstance(recompute, list):
        unknown = [u for u in recompute if u not in units]
        if unknown or not all(isinstance(u, str) for u in recompute):
            raise SplitConfigError(f"split.recompute: unit {unknown[0] if unknown else recompute!r} is not in "
                                   "the recompute ladder")
        recompute = tuple(recompute)
    elif recompute not in RECOMPUTE_POLICIES:
        raise SplitConfigError(f"split.recompute: expected one of {', '.join(RECOMPUTE_POLICIES)} or a list of "
                               f"units, got {recompute!r}")
    values: dict[str, float] = {}
    for key, default, lo, hi in (("approach_fraction", 0.85, 0.01, 1.0), ("connect_timeout_s", 30.0, 0.1, 3600.0),
                                 ("io_timeout_s", 300.0, 0.1, 86400.0)):
        v = d.get(key, default)
        if not _number(v) or not lo <= v <= hi:
            raise SplitConfigError(f"split.{key}: expected a number in [{lo:g}, {hi:g}], got {v!r}")
        values[key] = float(v)
    max_frame = d.get("max_frame_bytes", SplitConfig.max_frame_bytes)
    if not _int(max_frame) or max_frame < 1024:
        raise SplitConfigError(f"split.max_frame_bytes: expected an integer >= 1024, got {max_frame!r}")
    torch_conv = d.get("torch_conv", SplitConfig.torch_conv)
    if torch_conv not in TORCH_CONV_KERNELS:
        raise SplitConfigError(f"split.torch_conv: expected one of {', '.join(TORCH_CONV_KERNELS)}, got {torch_conv!r}")
    return SplitConfig(host=host, port=port, token=token, cut=cut, activation_shape=tuple(shape),
                       footprint_bytes=footprint, ladder=tuple(ladder), recompute=recompute,
                       max_frame_bytes=max_frame, torch_conv=torch_conv, **values)
