"""Start and stop virtual phones: one adbd child process per phone.

Child processes (not threads) so a phone behaves like a separate device: ``kill -9`` of
one adbd (``kill_adbd()``) drops exactly that phone's connections, and the phone's
resource accounting (CPU -> battery current, RSS -> low-memory killer, throttling)
covers precisely the processes that adbd started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from ..adb import protocol as p
from ..errors import TestbedError
from ..keys import android_key_path, fedblocks_key_path
from .adbd import DaemonConfig
from .profiles import PhoneProfile
from .sandbox import check_state_dir

RESERVED_PORTS = range(5555, 5586)   # the adb server probes these for emulators
START_TIMEOUT_S = 20.0


def default_authorized_key_files(existing_only: bool = True) -> list[Path]:
    """~/.android/adbkey.pub and the fedblocks key's .pub (whichever exist, unless existing_only=False)."""
    candidates = [Path(str(android_key_path()) + ".pub"), Path(str(fedblocks_key_path()) + ".pub")]
    env_key = os.environ.get("FEDBLOCKS_ADB_KEY")
    if env_key:
        candidates.insert(0, Path(env_key + ".pub"))
    return [path for path in candidates if path.is_file() or not existing_only]


def read_authorized_keys(files: list[Path]) -> list[str]:
    """Android public key lines from the files (one key per line); errors name file and line."""
    keys: list[str] = []
    for path in files:
        path = Path(path).expanduser()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise TestbedError(f"authorized keys file {path}: cannot read: {exc}") from exc
        for number, line in enumerate(lines, 1):
            line = line.strip().strip("\0")
            if not line or line.startswith("#"):
                continue
            try:
                p.decode_android_pubkey(line)
            except p.KeyFormatError as exc:
                raise TestbedError(f"authorized keys file {path} line {number}: {exc} "
                                   "(expected an Android adbkey.pub line: 'base64 user@host')") from exc
            keys.append(line)
    return keys


def check_port(port: int) -> None:
    if not 1024 <= port <= 65535:
        raise TestbedError(f"port {port} is out of range: use 1024..65535")
    if port in RESERVED_PORTS:
        raise TestbedError(f"port {port} is in 5555-5585, which the adb server probes for emulators: "
                           "use ports outside it (e.g. --base-port 6520)")


class VirtualPhone:
    """A virtual Android phone reachable over adb at ``127.0.0.1:port``."""

    def __init__(self, port: int, profile: PhoneProfile, state_dir: Path,
                 authorized_keys: list[Path] | None = None, serial_name: str | None = None) -> None:
        check_port(port)
        self.port = port
        self.profile = profile
        self.state_dir = check_state_dir(Path(state_dir))
        self.name = serial_name or f"vphone-{port}"
        self.phone_dir = self.state_dir / self.name
        # The phone watches these files (a real adbd re-reads adb_keys): with the defaults, a key
        # that adb creates on its first start is accepted without restarting the phone.
        self.key_files = ([Path(k) for k in authorized_keys] if authorized_keys is not None
                          else default_authorized_key_files(existing_only=False))
        self.authorized_keys = read_authorized_keys([k for k in self.key_files if k.is_file()])  # validates them
        if not self.authorized_keys and authorized_keys is not None:
            raise TestbedError("no authorized adb keys in " + ", ".join(str(k) for k in self.key_files)
                               + ": pass a file of Android adbkey.pub lines")
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None
        self._orphans: list[int] = []
        # "namespace" (processes see /data/local/tmp etc.) or "rewrite" (see docs/virtual_phones.md)
        self.path_mapping = ""

    @property
    def serial(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sandbox(self) -> Path:
        """The host directory standing in for the phone's filesystem root."""
        return self.phone_dir / "root"

    @property
    def log_path(self) -> Path:
        return self.phone_dir / "adbd.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> VirtualPhone:
        if self.running:
            return self
        self.phone_dir.mkdir(parents=True, exist_ok=True)
        config = DaemonConfig(port=self.port, profile=self.profile, root=self.sandbox,
                              state_file=self.phone_dir / "battery.json", serial=self.serial,
                              authorized_keys=[], python=sys.executable,
                              key_files=tuple(str(k) for k in self.key_files))
        config_path = self.phone_dir / "adbd.json"
        config_path.write_text(config.to_json())
        log = open(self.log_path, "ab")
        self._log_file = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedblocks.testbed.virtual.daemon_main", "--config", str(config_path)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, close_fds=True)
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.startswith((b"READY", b"ERROR")) or not line:
                break
        if line.startswith(b"READY"):
            parts = line.decode().split()
            self.path_mapping = parts[2] if len(parts) > 2 else "rewrite"
        else:
            self.stop()
            message = line.decode(errors="replace").strip().removeprefix("ERROR ")
            raise TestbedError(f"virtual phone on port {self.port} failed to start: "
                               f"{message or 'see ' + str(self.log_path)}")
        return self

    def kill_adbd(self) -> None:
        """Crash the phone's adbd (SIGKILL) to test fault handling; its processes are left
        running as they would be on a phone. stop() cleans them up."""
        if self.process is not None and self.process.poll() is None:
            self._orphans = _phone_processes(self.process.pid)
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            orphans, self._orphans = self._orphans, []
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            for pid in orphans:
                for sig in (signal.SIGKILL, signal.SIGCONT):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def __enter__(self) -> VirtualPhone:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _phone_processes(adbd_pid: int) -> list[int]:
    from .proctree import descendants

    return [info.pid for info in descendants(adbd_pid)]


class VirtualTestbed:
    """N virtual phones on ports base_port .. base_port+N-1 (each its own adbd process)."""

    def __init__(self, count: int, base_port: int, profile: PhoneProfile | list[PhoneProfile],
                 state_dir: Path | None = None, authorized_keys: list[Path] | None = None) -> None:
        if count < 1:
            raise TestbedError(f"--count must be at least 1, got {count}")
        profiles = profile if isinstance(profile, list) else [profile] * count
        if len(profiles) != count:
            raise TestbedError(f"{len(profiles)} profiles given for {count} phones")
        for port in range(base_port, base_port + count):
            check_port(port)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedblocks-testbed-")
            state_dir = Path(self._tmp.name)
        self.state_dir = Path(state_dir)
        self.phones = [VirtualPhone(base_port + i, profiles[i], self.state_dir, authorized_keys)
                       for i in range(count)]

    @property
    def serials(self) -> list[str]:
        return [phone.serial for phone in self.phones]

    def start(self) -> VirtualTestbed:
        try:
            for phone in self.phones:
                phone.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for phone in self.phones:
            phone.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> VirtualTestbed:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
