"""``fedblocks testbed virtual``: runs phones until SIGINT; clear one-line errors."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from vphone_support import adb_shell_device, free_port, make_key

from fedblocks.testbed.virtual.registry import running_serials

FEDBLOCKS = [sys.executable, "-m", "fedblocks.host.cli"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDBLOCKS, "testbed", "virtual", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_runs_phones_until_interrupted(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    base = free_port()
    proc = subprocess.Popen([*FEDBLOCKS, "testbed", "virtual", "--count", "2", "--base-port", str(base),
                             "--profile", "lowend", "--authorized-keys", f"{key}.pub",
                             "--state-dir", str(tmp_path / "state"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            if "in use" in err:
                pytest.skip(f"port range taken: {err}")
            raise AssertionError(err)
        info = json.loads(line)
        assert info["serials"] == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
        assert info["profile"] == "lowend-2gb"
        device = adb_shell_device(base + 1, key)
        assert device.shell("getprop ro.product.model").strip() == "Virtual A2 Lite"
        device.close()
        # announced for discovery while they run (no adb server, no FEDBLOCKS_DEVICES needed)
        assert running_serials() == info["serials"]
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=20)
    assert rc == 0
    assert running_serials() == []
    with socket.socket() as sock:   # the phones are gone, their ports free again
        sock.bind(("127.0.0.1", base))


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    cases = [
        (["--base-port", "5570", "--authorized-keys", f"{key}.pub"], "5555-5585"),
        (["--profile", "no-such-phone", "--authorized-keys", f"{key}.pub"], "unknown profile 'no-such-phone'"),
        (["--authorized-keys", str(tmp_path / "missing.pub")], "does not exist"),
        (["--count", "0"], "--count"),
    ]
    bad_profile = tmp_path / "bad.toml"
    bad_profile.write_text('name="x"\nmodel="m"\ndevice="d"\nmanufacturer="f"\nsoc="s"\nram_mb=-1\n')
    cases.append((["--profile", str(bad_profile), "--authorized-keys", f"{key}.pub"], "'ram_mb'"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases.append((["--base-port", str(port), "--authorized-keys", f"{key}.pub"], "already in use"))
        for args, message in cases:
            result = _run(*args, "--base-port" if "--base-port" not in args else "--json",
                          *([str(free_port())] if "--base-port" not in args else []))
            assert result.returncode == 2, (args, result.stderr)
            assert message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
