"""The `split` section of a job: defaults, and a one-line error naming the field for each bad value."""

from __future__ import annotations

from typing import Any

import pytest

from fedblocks.device_runtime.spec import StageSpec
from fedblocks.device_runtime.split_config import SplitConfigError, parse_split_config

from .split_fixtures import SplitExport, export_split, split_section

CUT = "1.stem.conv"
TOKEN = "ab" * 16


@pytest.fixture(scope="module")
def exported() -> SplitExport:
    return export_split()


def _stage(exported: SplitExport) -> StageSpec:
    return StageSpec.from_dict(exported.front(CUT).to_dict())


def test_a_valid_section_parses_with_its_defaults(exported: SplitExport) -> None:
    cfg = parse_split_config(split_section(exported, CUT, 7100, TOKEN), _stage(exported))
    assert (cfg.host, cfg.port, cfg.cut, cfg.recompute, cfg.torch_conv) == ("127.0.0.1", 7100, CUT, "auto", "onednn")
    assert parse_split_config(cfg.to_dict(), _stage(exported)) == cfg  # what to_dict writes parses back
    native = parse_split_config(split_section(exported, CUT, 7100, TOKEN, torch_conv="native"), _stage(exported))
    assert native.torch_conv == "native"


@pytest.mark.parametrize(("change", "field"), [
    ({"torch_conv": "mkl"}, "split.torch_conv"),
    ({"server": {"host": "127.0.0.1", "port": 0}}, "split.server.port"),
    ({"server": {"host": "bad host;rm", "port": 7100}}, "split.server.host"),
    ({"token": "not-hex"}, "split.token"),
    ({"activation_shape": [1, 2, 3]}, "split.activation_shape"),
    ({"recompute": ["blocks.9"]}, "split.recompute"),
    ({"recompute": "sometimes"}, "split.recompute"),
    ({"approach_fraction": 2.0}, "split.approach_fraction"),
    ({"footprint_bytes": -1}, "split.footprint_bytes"),
    ({"max_frame_bytes": 10}, "split.max_frame_bytes"),
])
def test_each_bad_field_is_named(exported: SplitExport, change: dict[str, Any], field: str) -> None:
    section = {**split_section(exported, CUT, 7100, TOKEN), **change}
    with pytest.raises(SplitConfigError) as info:
        parse_split_config(section, _stage(exported))
    assert str(info.value).startswith(field) and "\n" not in str(info.value)
