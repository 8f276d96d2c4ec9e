"""Resource models of a virtual phone: battery/thermal sysfs, the low-memory killer, CPU throttling."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vphone_support import RawClient, adb_shell_device, free_port, load_private_key, make_key, parse_shell_v2

from fedblocks.testbed.virtual import VirtualPhone, load_profile
from fedblocks.testbed.virtual.proctree import descendants

BASE = 'name="lab-{name}"\nmodel="Lab {name}"\ndevice="lab{name}"\nmanufacturer="Lab"\nsoc="X1"\n'


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_key(tmp_path_factory.mktemp("rkeys"))


def _phone(tmp_path: Path, key: Path, name: str, extra: str) -> VirtualPhone:
    profile_file = tmp_path / f"{name}.toml"
    profile_file.write_text(BASE.format(name=name) + extra)
    return VirtualPhone(free_port(), load_profile(profile_file), tmp_path / "state", [Path(f"{key}.pub")])


def _shell_v2(phone: VirtualPhone, key: Path, command: str) -> tuple[bytes, bytes, int | None]:
    client = RawClient(phone.port, timeout=60)
    client.connect(load_private_key(key))
    local, remote = client.open(f"shell,v2,raw:{command}".encode())
    try:
        return parse_shell_v2(client.read_until_close(local, remote))
    finally:
        client.close()


@pytest.fixture(scope="module")
def power_phone(tmp_path_factory: pytest.TempPathFactory, key: Path) -> Iterator[VirtualPhone]:
    tmp = tmp_path_factory.mktemp("power")
    with _phone(tmp, key, "power", "cpu_speed=1.0\nidle_mw=300.0\nactive_mw=1500.0\nvoltage=3.85\n"
                "battery_mah=3000.0\nthermal_tau_s=5.0\nthermal_resistance=20.0\n") as phone:
        yield phone


def test_sysfs_current_rises_under_cpu_load(power_phone: VirtualPhone, key: Path, tmp_path: Path) -> None:
    device = adb_shell_device(power_phone.port, key)
    try:
        def read(path: str) -> int:
            return int(device.shell(f"cat {path}").strip())

        battery = "/sys/class/power_supply/battery"
        time.sleep(0.8)
        idle_ua = read(f"{battery}/current_now")
        voltage_uv = read(f"{battery}/voltage_now")
        idle_temp = read("/sys/class/thermal/thermal_zone0/temp")
        charge_before = read(f"{battery}/charge_counter")
        assert idle_ua < 0, "Linux sign convention: negative while discharging"
        # idle: 300 mW / V
        assert abs(abs(idle_ua) - 300e3 / (voltage_uv / 1e6)) < 0.25 * 300e3 / 3.85
        assert 0 < read(f"{battery}/capacity") <= 100
        assert device.shell(f"cat {battery}/status").strip() == "Discharging"
        # a CPU-bound job in the background, as the device runtime would be started
        # The job records the CPU share it really got: the host's 2 cores are shared with
        # other work, and the model charges only CPU time the phone's processes used.
        device.shell("nohup python3 -c 'import time\nt=time.time()\nwhile time.time()-t<3: pass\n"
                     "open(\"share\", \"w\").write(str(time.process_time()/(time.time()-t)))' "
                     ">/dev/null 2>&1 &")
        time.sleep(1.8)
        busy_ua = read(f"{battery}/current_now")
        busy_temp = read("/sys/class/thermal/thermal_zone0/temp")
        time.sleep(1.5)
        share = float(device.shell("cat /data/local/tmp/share"))
        expected_rise_ua = share * 1500e3 / 4.0
        print(f"sysfs: idle {idle_ua} uA, busy {busy_ua} uA, job CPU share {share:.2f}, "
              f"expected rise {expected_rise_ua:.0f} uA")
        assert abs(busy_ua) - abs(idle_ua) > max(20e3, 0.4 * expected_rise_ua), (idle_ua, busy_ua, share)
        assert busy_temp > idle_temp + 500, (idle_temp, busy_temp)   # +0.5 degC at least
        assert read(f"{battery}/charge_counter") < charge_before
        # the runtime (a pushed script: file contents are not path-mapped) finds the files via the env
        script = tmp_path / "probe.py"
        script.write_text("import os\nroot = os.environ['FEDBLOCKS_SYSFS_ROOT']\n"
                          "print(open(root + '/sys/class/power_supply/battery/voltage_now').read().strip())\n")
        device.push(str(script), "/data/local/tmp/probe.py")
        via_env = device.shell("python3 /data/local/tmp/probe.py")
        assert int(via_env.strip()) > 3_000_000
    finally:
        device.close()


def test_low_memory_killer(tmp_path: Path, key: Path) -> None:
    with _phone(tmp_path, key, "lmk", "ram_mb=1024\nbudget_mb=200\n") as phone:
        start = time.monotonic()
        out, _err, code = _shell_v2(phone, key, "python3 -c \"x = b'\\x01' * (400 << 20); "
                                    "import time; time.sleep(20)\"; echo not-reached")
        assert code == 137   # 128 + SIGKILL
        assert b"not-reached" not in out
        assert time.monotonic() - start < 15
        records = [json.loads(line) for line in (phone.sandbox / "data/local/tmp/fedblocks/lmk.log")
                   .read_text().splitlines()]
        assert len(records) == 1
        assert records[0]["budget_mb"] == 200 and records[0]["tree_rss_mb"] > 200
        # small work under the budget is untouched
        assert _shell_v2(phone, key, "python3 -c \"x = b'\\x01' * (50 << 20); print(len(x))\"") == \
            (b"52428800\n", b"", 0)


# A fixed amount of CPU time (0.6 s), not of work: on a fast host a fixed loop can finish
# within one throttle period and never be held.
CPU_LOOP = ("python3 -c \"import time\nt=time.perf_counter()\nc=time.process_time()\n"
            "while time.process_time()-c < 0.6: sum(range(1000))\nprint(time.perf_counter()-t, time.process_time()-c)\"")


def _loop_seconds(phone: VirtualPhone, key: Path) -> tuple[float, float]:
    """(wall seconds, CPU share) of the faster of two runs of a CPU-bound loop."""
    runs = []
    for _ in range(2):
        out, err, code = _shell_v2(phone, key, CPU_LOOP)
        assert code == 0, err
        wall, cpu = (float(x) for x in out.split())
        runs.append((wall, cpu / wall))
    return min(runs)


def test_throttle_slows_cpu_bound_work(tmp_path: Path, key: Path) -> None:
    # the unthrottled loop runs before and after the throttled one: a host that had a core free
    # both times most likely had one free in between (a starved throttled run reads as too slow)
    with _phone(tmp_path, key, "fast", "cpu_speed=1.0\n") as fast:
        before = _loop_seconds(fast, key)
        with _phone(tmp_path, key, "slow", "cpu_speed=0.4\n") as slow:
            slow_s, slow_share = _loop_seconds(slow, key)
            # nothing stays stopped once the command is over
            leftovers = [p for p in descendants(slow.process.pid) if p.state == "T"]  # type: ignore[union-attr]
            assert leftovers == []
        after = _loop_seconds(fast, key)
    fast_s, fast_share = min(before[0], after[0]), min(before[1], after[1])  # fastest wall, lowest share
    ratio = slow_s / fast_s
    print(f"throttle: speed 1.0 {fast_s:.3f} s (CPU share {fast_share:.2f}), speed 0.4 {slow_s:.3f} s "
          f"(CPU share {slow_share:.2f}), ratio {ratio:.2f} (ideal 2.5)")
    # Holds whatever else loads the host: a 0.4 phone never gets more than ~40% of a core.
    assert slow_share < 0.4 + 0.12
    # The wall-clock slowdown is only visible when the unthrottled runs had a core to themselves;
    # on an oversubscribed host both are starved alike (5.4 was seen with two quickstarts and
    # the test suite on 2 cores, when only the run before had a core).
    if fast_share > 0.8:
        assert 1.6 < ratio < 5.0
    else:
        assert ratio > 1.0
