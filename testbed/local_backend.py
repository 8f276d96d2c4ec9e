"""LocalDevice: the Device contract on a local directory, with plain subprocesses.

For unit tests and for running the device runtime on the host itself. Device paths
are ordinary local paths; ``base_dir`` is the directory this "device" owns.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from .device import Device, DeviceError, DeviceTimeout, DirEntry, ShellResult, TransferProgress

_DECODE_ERRORS = "backslashreplace"


class LocalDevice(Device):
    def __init__(self, base_dir: Path, serial: str | None = None, env: dict[str, str] | None = None) -> None:
        """``env``: variables to set for every command (e.g. a PATH without python)."""
        base = Path(base_dir).resolve()
        base.mkdir(parents=True, exist_ok=True)
        self.base_dir = str(base)
        self.serial = serial or f"local:{base}"
        self.env = {**os.environ, **env} if env else None

    def _shell(self, command: str, timeout_s: float | None, idempotent: bool) -> ShellResult:
        # own session: a timeout kills the command's whole process group, nothing lingers
        proc = subprocess.Popen(
            ["sh", "-c", command], cwd=self.base_dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=self.env,
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise DeviceTimeout(
                f"{self.serial}: command did not finish within {timeout_s:g} s: {command[:120]!r}"
            ) from None
        return ShellResult(out.decode("utf-8", _DECODE_ERRORS), err.decode("utf-8", _DECODE_ERRORS),
                           proc.returncode)

    def reverse(self, device_port: int, host_port: int) -> int:
        """The "device" is this machine: its 127.0.0.1 is the host's, so nothing needs mapping."""
        if device_port not in (0, host_port):
            raise DeviceError(f"{self.serial}: a local device reaches the host's port {host_port} directly; "
                              f"it cannot be moved to port {device_port}")
        return host_port

    def _push_raw(self, local: Path, remote: str, progress: TransferProgress) -> None:
        _copy(Path(local), Path(remote), progress, f"push to {self.serial}:{remote}")

    def _pull_raw(self, remote: str, local: Path, progress: TransferProgress) -> None:
        _copy(Path(remote), Path(local), progress, f"pull from {self.serial}:{remote}")

    def _list_raw(self, remote: str) -> list[DirEntry]:
        try:
            with os.scandir(remote) as it:
                return [DirEntry(e.name, _kind(e), e.stat(follow_symlinks=False).st_size) for e in it]
        except OSError as exc:
            raise DeviceError(f"{self.serial}: cannot list {remote!r}: {exc.strerror or exc}") from exc


def _kind(entry: os.DirEntry[str]) -> str:
    if entry.is_symlink():
        return "other"
    return "dir" if entry.is_dir() else "file" if entry.is_file() else "other"


def _copy(src: Path, dst: Path, progress: TransferProgress, what: str) -> None:
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while block := fin.read(1 << 20):
                fout.write(block)
                progress.advance(len(block))
    except OSError as exc:
        raise DeviceError(f"{what}: {exc.strerror or exc}") from exc


__all__ = ["LocalDevice"]
