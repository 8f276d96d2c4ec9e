"""What a device sends back is untrusted: names, digests, properties are validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedblocks.testbed.device import DeviceError, DirEntry, parse_properties
from fedblocks.testbed.local_backend import LocalDevice


class LyingDevice(LocalDevice):
    def __init__(self, base: Path, names: list[str]) -> None:
        super().__init__(base)
        self.names = names

    def _list_raw(self, remote: str) -> list[DirEntry]:
        return [DirEntry(name, "file", 1) for name in self.names]


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "nul\0byte"])
def test_hostile_listing_names_are_refused(tmp_path: Path, name: str) -> None:
    device = LyingDevice(tmp_path / "dev", [".", "..", "ok.json", name])
    with pytest.raises(DeviceError, match="unsafe file name"):
        device.pull_dir(device.base_dir, tmp_path / "out")
    assert not (tmp_path / "escape").exists()


def test_listing_skips_dot_entries(tmp_path: Path) -> None:
    device = LyingDevice(tmp_path / "dev", [".", "..", "b", "a"])
    assert [e.name for e in device.listdir(device.base_dir)] == ["a", "b"]


def test_garbage_sha256sum_output(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sha256sum"
    fake.write_text("#!/bin/sh\necho 'zzzz  -'\n")
    fake.chmod(0o755)
    device = LocalDevice(tmp_path / "dev", env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    (tmp_path / "dev" / "f").write_bytes(b"x")
    with pytest.raises(DeviceError, match="not a sha256 digest"):
        device.sha256(f"{device.base_dir}/f")


def test_properties_parser_rejects_nonsense() -> None:
    props = parse_properties("s", "\n".join([
        "model=" + "M" * 500, "soc=", "abi=arm64-v8a", "sdk=thirty", "mem_kb=-5x",
        "battery_pct=250", "battery_temp=99999", "thermal=cpu=abc", "no equals sign here",
    ]))
    assert props.model == "M" * 200  # truncated
    assert props.soc is None and props.sdk is None and props.ram_mb is None
    assert props.battery_pct is None and props.temperature_c is None
    assert props.abi == "arm64-v8a"


def test_properties_thermal_fallback() -> None:
    props = parse_properties("s", "mem_kb=4194304\nthermal=cpu-0=51000\nthermal=battery=31500\n")
    assert props.ram_mb == 4096
    assert props.temperature_c == 31.5  # a battery zone is preferred over the first zone
