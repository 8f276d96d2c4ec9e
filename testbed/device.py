"""The Device interface: one contract, three backends (adb, virtual phones via adb, local).

Everything a host does to a phone goes through these methods, so the round loop is
the same for a real phone, a virtual one and a local directory. The base class holds
the logic every backend shares (verified pushes, job control, properties, sha256):
a backend only supplies a raw shell, a raw file copy in each direction and close().

Shell commands: a *sequence* is joined with shlex.quote (safe for any file name); a
*string* is passed to the device's ``sh -c`` as-is, so quoting it is the caller's job.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import TestbedError

ProgressCallback = Callable[[int, int], None]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,80}$")


class DeviceError(TestbedError):
    """A device operation failed (command, transfer, protocol): the message says which and why."""


class DeviceTimeout(DeviceError):
    """A device operation did not finish within its time limit."""


class DeviceConnectionError(DeviceError):
    """The connection dropped. ``reconnected``: a fresh connection is up again (the failed
    operation was not retried because it is not idempotent); False: the device is unreachable."""

    def __init__(self, message: str, *, reconnected: bool = False) -> None:
        super().__init__(message)
        self.reconnected = reconnected


class TransferError(DeviceError):
    """A push or pull failed, or its content did not verify after the allowed retries."""


@dataclass(frozen=True)
class ShellResult:
    """What a shell command left behind. ``stderr_merged``: the backend could not separate
    stderr (adb shell v1), so it is inside ``stdout`` and ``stderr`` is empty."""

    stdout: str
    stderr: str
    exit_code: int
    stderr_merged: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self, what: str) -> ShellResult:
        """Return self, or raise DeviceError naming ``what`` with the command's own error text."""
        if self.exit_code != 0:
            detail = (self.stderr or self.stdout).strip().splitlines()
            tail = detail[-1] if detail else "no output"
            raise DeviceError(f"{what} failed (exit {self.exit_code}): {tail}")
        return self


@dataclass(frozen=True)
class DeviceProperties:
    """Identity and state of a device; None where the device does not expose the value."""

    serial: str
    model: str | None
    soc: str | None
    abi: str | None
    ram_mb: int | None
    sdk: int | None
    battery_pct: int | None
    temperature_c: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobHandle:
    """A detached job on a device: its files live in ``job_dir`` (pid, rc, log)."""

    job_id: str
    pid: int
    workdir: str
    job_dir: str

    @property
    def log_path(self) -> str:
        return f"{self.job_dir}/log"

    @property
    def rc_path(self) -> str:
        return f"{self.job_dir}/rc"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobStatus:
    """``state``: running | exited | killed | lost (process gone without an exit status,
    e.g. the phone rebooted). ``exit_code`` is set for exited and killed jobs."""

    running: bool
    exit_code: int | None
    log_tail: str
    state: str


@dataclass(frozen=True)
class DirEntry:
    """One directory entry on a device; ``kind`` is "file", "dir" or "other" (links, devices)."""

    name: str
    kind: str
    size: int


@dataclass
class TransferProgress:
    """Turns per-chunk sizes (what adb-shell reports) into a running (done, total) callback."""

    total: int
    callback: ProgressCallback | None = None
    done: int = field(default=0)

    def advance(self, nbytes: int) -> None:
        self.done = min(self.total, self.done + nbytes)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def reset(self) -> None:
        """A retried transfer starts again from zero."""
        self.done = 0
        if self.callback is not None:
            self.callback(0, self.total)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def quote_command(cmd: str | Sequence[str]) -> str:
    """A string passes through unchanged; a sequence becomes one shlex-quoted command line."""
    if isinstance(cmd, str):
        return cmd
    parts = list(cmd)
    if not parts:
        raise ValueError("empty command")
    return shlex.join(str(p) for p in parts)


def _q(path: str) -> str:
    return shlex.quote(path)


# One script for every backend: Android first (getprop, power_supply/battery), then
# plain Linux fallbacks so LocalDevice reports the host it runs on. Output: key=value lines.
_PROPERTIES_SCRIPT = r"""
gp() { command -v getprop >/dev/null 2>&1 && getprop "$1" 2>/dev/null; }
v=$(gp ro.product.model); [ -n "$v" ] || v=$(uname -n 2>/dev/null); echo "model=$v"
v=$(gp ro.soc.model); [ -n "$v" ] || v=$(gp ro.board.platform); [ -n "$v" ] || v=$(gp ro.hardware)
[ -n "$v" ] || v=$(sed -n 's/^\(model name\|Hardware\)[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n 1)
echo "soc=$v"
v=$(gp ro.product.cpu.abi); [ -n "$v" ] || v=$(uname -m 2>/dev/null); echo "abi=$v"
echo "sdk=$(gp ro.build.version.sdk)"
echo "mem_kb=$(sed -n 's/^MemTotal:[[:space:]]*\([0-9]*\).*/\1/p' /proc/meminfo 2>/dev/null)"
bat=""
for d in /sys/class/power_supply/battery /sys/class/power_supply/BAT0 /sys/class/power_supply/BAT1; do
  if [ -r "$d/capacity" ]; then bat=$d; break; fi
done
if [ -n "$bat" ]; then
  echo "battery_pct=$(cat "$bat/capacity" 2>/dev/null)"
  echo "battery_temp=$(cat "$bat/temp" 2>/dev/null)"
fi
for z in /sys/class/thermal/thermal_zone*; do
  [ -r "$z/temp" ] || continue
  echo "thermal=$(cat "$z/type" 2>/dev/null | tr -d ' =')=$(cat "$z/temp" 2>/dev/null)"
done
"""


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if re.fullmatch(r"-?[0-9]{1,12}", text) else None


def parse_properties(serial: str, output: str) -> DeviceProperties:
    """Parse _PROPERTIES_SCRIPT output; untrusted text: anything malformed becomes None."""
    values: dict[str, str] = {}
    thermal: list[tuple[str, int]] = []
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "thermal":
            zone, _, raw = value.rpartition("=")
            milli = _int_or_none(raw)
            if milli is not None:
                thermal.append((zone, milli))
        else:
            values[key] = value.strip()[:200]
    mem_kb = _int_or_none(values.get("mem_kb"))
    battery = _int_or_none(values.get("battery_pct"))
    if battery is not None and not 0 <= battery <= 100:
        battery = None
    temperature: float | None = None
    battery_temp = _int_or_none(values.get("battery_temp"))
    if battery_temp is not None:
        temperature = battery_temp / 10.0  # Android reports tenths of a degree
    elif thermal:
        # prefer a battery/skin zone, else the first zone; sysfs gives millidegrees
        preferred = [t for t in thermal if any(k in t[0].lower() for k in ("battery", "skin", "soc"))]
        temperature = (preferred or thermal)[0][1] / 1000.0
    if temperature is not None and not -40.0 <= temperature <= 150.0:
        temperature = None
    return DeviceProperties(
        serial=serial,
        model=values.get("model") or None,
        soc=values.get("soc") or None,
        abi=values.get("abi") or None,
        ram_mb=mem_kb // 1024 if mem_kb is not None else None,
        sdk=_int_or_none(values.get("sdk")),
        battery_pct=battery,
        temperature_c=temperature,
    )


class Device(ABC):
    """A phone (or a stand-in) the host can push to, pull from and run commands on.

    ``base_dir`` is the device directory fedblocks owns (cache, runtime, jobs).
    """

    serial: str
    base_dir: str
    push_attempts: int = 3
    transfer_retries: int = 0  # attempts repeated after a failed verification or a dropped link

    # ----- what a backend implements -------------------------------------------------
    @abstractmethod
    def _shell(self, command: str, timeout_s: float | None, idempotent: bool) -> ShellResult:
        """Run ``command`` with the device's sh; raise DeviceTimeout past ``timeout_s``.
        ``idempotent``: the backend may transparently retry it after a reconnect."""

    @abstractmethod
    def _push_raw(self, local: Path, remote: str, progress: TransferProgress) -> None:
        """Copy a local file to ``remote`` (no verification)."""

    @abstractmethod
    def _pull_raw(self, remote: str, local: Path, progress: TransferProgress) -> None:
        """Copy ``remote`` into the local file ``local`` (no verification)."""

    @abstractmethod
    def _list_raw(self, remote: str) -> list[DirEntry]:
        """Entries of a device directory (names as the device sends them, unvalidated)."""

    def close(self) -> None:  # noqa: B027 - backends without a connection need nothing
        """Release the connection."""

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.serial!r})"

    # ----- reverse port forwarding (adb reverse) -----------------------------------------
    def reverse(self, device_port: int, host_port: int) -> int:
        """Make the device's 127.0.0.1:``device_port`` reach this host's 127.0.0.1:``host_port``
        (``adb reverse tcp:D tcp:H``); ``device_port`` 0 lets the device pick. Returns the device
        port. The mapping lasts until remove_reverse or close."""
        raise DeviceError(f"{self.serial}: {type(self).__name__} cannot map ports (no adb reverse)")

    def remove_reverse(self, device_port: int) -> None:  # noqa: B027 - nothing to undo without reverse()
        """Undo reverse(); a port that is not mapped is ignored."""

    # ----- shell -------------------------------------------------------------------------
    def shell(self, cmd: str | Sequence[str], timeout_s: float | None = 60, *, idempotent: bool = False
              ) -> ShellResult:
        """Run a command; returns stdout, stderr and the exit code.

        A sequence is shlex-quoted argument by argument; a string is passed as-is (the
        caller quotes). ``timeout_s=None`` waits without limit (prefer start_job for long work).
        """
        return self._shell(quote_command(cmd), timeout_s, idempotent)

    def _query(self, cmd: str | Sequence[str], timeout_s: float = 60) -> ShellResult:
        """A read-only command: safe to retry after a reconnect."""
        return self.shell(cmd, timeout_s, idempotent=True)

    # ----- files -------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self._query(f"test -e {_q(path)}").exit_code == 0

    def size(self, path: str) -> int | None:
        """Size in bytes of a regular file, None when it is missing."""
        res = self._query(f"test -f {_q(path)} && wc -c < {_q(path)}")
        if res.exit_code != 0:
            return None
        value = _int_or_none(res.stdout)
        if value is None:
            raise DeviceError(f"{self.serial}: unexpected size output for {path!r}: {res.stdout[:80]!r}")
        return value

    def sha256(self, path: str, timeout_s: float = 300) -> str:
        """Hex sha256 of a device file (``sha256sum``, else ``toybox sha256sum``)."""
        p = _q(path)
        res = self._query(
            f"test -f {p} || {{ echo 'no such file' >&2; exit 2; }}; "
            f"if command -v sha256sum >/dev/null 2>&1; then sha256sum < {p}; else toybox sha256sum < {p}; fi",
            timeout_s,
        )
        res.check(f"sha256 of {path!r} on {self.serial}")
        digest = res.stdout.strip().split(" ", 1)[0].lower()
        if not _SHA256_RE.match(digest):
            raise DeviceError(f"{self.serial}: sha256sum printed {res.stdout[:100]!r}, not a sha256 digest")
        return digest

    def makedirs(self, path: str) -> None:
        self._query(["mkdir", "-p", path]).check(f"mkdir -p {path!r} on {self.serial}")

    def remove(self, path: str) -> None:
        """Remove a file (or a directory tree); missing is fine."""
        self._query(["rm", "-rf", "--", path]).check(f"rm {path!r} on {self.serial}")

    def push(self, local: Path, remote: str, progress: ProgressCallback | None = None,
             *, sha256: str | None = None) -> None:
        """Copy ``local`` to ``remote``, verified.

        The bytes go to a temporary name beside ``remote``; size and on-device sha256 are
        compared with the local file, a mismatch (or a dropped connection) retries up to
        ``push_attempts`` times, and only a verified file is renamed into place. So
        ``remote`` is either absent, the previous file, or exactly ``local``.
        """
        local = Path(local)
        if not local.is_file():
            raise TransferError(f"push: {local} is not a file")
        total = local.stat().st_size
        expected = sha256 or sha256_file(local)
        parent = remote.rsplit("/", 1)[0] if "/" in remote.strip("/") else None
        if parent:
            self.makedirs(parent)
        tmp = f"{remote}.fbpart-{secrets.token_hex(4)}"
        tracker = TransferProgress(total, progress)
        problem = ""
        device_gone = False
        for attempt in range(1, self.push_attempts + 1):
            if attempt > 1:
                self.transfer_retries += 1
                tracker.reset()
                # a failed attempt leaves a partial or wrong temp file behind
                self._remove_quietly(tmp)
            try:
                self._push_raw(local, tmp, tracker)
                got_size = self.size(tmp)
                if got_size != total:
                    problem = f"size on device {got_size}, expected {total}"
                    continue
                got = self.sha256(tmp)
                if got != expected:
                    problem = f"sha256 on device {got[:12]}..., expected {expected[:12]}..."
                    continue
                self._query(["mv", "-f", "--", tmp, remote]).check(f"rename into {remote!r}")
                return
            except DeviceConnectionError as exc:
                problem = str(exc)
                if not exc.reconnected:
                    device_gone = True
                    break  # the device is gone: retrying cannot help
            except DeviceTimeout as exc:
                problem = str(exc)
            except DeviceError:
                # not a transient fault (device full, permission denied): no retry, no debris
                self._remove_quietly(tmp)
                raise
        if not device_gone:
            self._remove_quietly(tmp)
        raise TransferError(
            f"push {local.name} -> {self.serial}:{remote} failed after {attempt} attempt(s): {problem}"
        )

    def _remove_quietly(self, path: str) -> None:
        try:
            self.shell(["rm", "-f", "--", path], 30, idempotent=True)
        except DeviceError:
            pass

    def pull(self, remote: str, local: Path, progress: ProgressCallback | None = None,
             *, verify: bool = True) -> None:
        """Copy a device file to ``local`` (written to a temporary name, renamed when done).

        ``verify``: compare size and sha256 with the device's copy; retried on mismatch.
        """
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        size = self.size(remote)
        if size is None:
            raise TransferError(f"pull: {self.serial}:{remote} does not exist (or is not a file)")
        expected = self.sha256(remote) if verify else None
        tmp = local.with_name(f".{local.name}.fbpart-{secrets.token_hex(4)}")
        tracker = TransferProgress(size, progress)
        last_problem = ""
        try:
            for attempt in range(1, self.push_attempts + 1):
                if attempt > 1:
                    self.transfer_retries += 1
                    tracker.reset()
                try:
                    self._pull_raw(remote, tmp, tracker)
                except DeviceConnectionError as exc:
                    last_problem = str(exc)
                    if not exc.reconnected:
                        break
                    continue
                except DeviceTimeout as exc:
                    last_problem = str(exc)
                    continue
                got_size = tmp.stat().st_size
                if got_size != size:
                    last_problem = f"pulled {got_size} bytes, device has {size}"
                    continue
                if expected is not None and sha256_file(tmp) != expected:
                    last_problem = "sha256 of the pulled file differs from the device's"
                    continue
                tmp.replace(local)
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise TransferError(f"pull {self.serial}:{remote} failed after {self.push_attempts} attempts: {last_problem}")

    def listdir(self, path: str) -> list[DirEntry]:
        """Entries of a device directory, sorted by name, without . and ..; a name that could
        leave the directory when used on the host ('/', NUL, '..') is a DeviceError."""
        entries = []
        for entry in self._list_raw(path):
            if entry.name in (".", ".."):
                continue
            if not entry.name or "/" in entry.name or "\0" in entry.name:
                raise DeviceError(f"{self.serial}: unsafe file name {entry.name!r} in {path!r}")
            entries.append(entry)
        return sorted(entries, key=lambda e: e.name)

    def pull_dir(self, remote: str, local: Path, *, max_files: int = 10_000) -> list[Path]:
        """Copy a device directory tree (regular files and directories; links and other
        special files are skipped) into ``local``; every file verified like pull()."""
        local = Path(local)
        pulled: list[Path] = []
        pending = [(remote.rstrip("/"), local)]
        while pending:
            src, dst = pending.pop()
            dst.mkdir(parents=True, exist_ok=True)
            for entry in self.listdir(src):
                if entry.kind == "dir":
                    pending.append((f"{src}/{entry.name}", dst / entry.name))
                elif entry.kind == "file":
                    if len(pulled) >= max_files:
                        raise TransferError(f"{self.serial}:{remote} holds more than {max_files} files")
                    self.pull(f"{src}/{entry.name}", dst / entry.name)
                    pulled.append(dst / entry.name)
        return pulled

    # ----- identity ------------------------------------------------------------------------
    def properties(self) -> DeviceProperties:
        res = self._query(_PROPERTIES_SCRIPT, 30)
        return parse_properties(self.serial, res.stdout)

    # ----- detached jobs ---------------------------------------------------------------------
    def start_job(self, cmd: str | Sequence[str], workdir: str, job_id: str | None = None) -> JobHandle:
        """Start ``cmd`` detached (own session, stdin/out/err redirected) in ``workdir``.

        Files in ``<base_dir>/jobs/<job_id>/``: ``pid``, ``log`` (stdout+stderr) and ``rc``
        (the exit status, written atomically when the command ends). No connection or read
        timeout can kill the job; the host polls.
        """
        job_id = job_id or f"job-{int(time.time())}-{secrets.token_hex(4)}"
        if not _JOB_ID_RE.match(job_id):
            raise ValueError(f"job id {job_id!r}: use letters, digits, '.', '_', '-' (at most 80)")
        command = quote_command(cmd)
        job_dir = f"{self.base_dir}/jobs/{job_id}"
        jd, wd = _q(job_dir), _q(workdir)
        # The inner sh runs the user's command as $1 (no re-quoting); the wrapper records
        # its own pid first and the exit status last (tmp + mv: never a half-written rc).
        wrapper = (
            'echo $$ > "$2/pid.tmp" && mv "$2/pid.tmp" "$2/pid"; cd "$3" || exit 125; '
            'sh -c "$1"; rc=$?; echo $rc > "$2/rc.tmp"; mv "$2/rc.tmp" "$2/rc"'
        )
        script = (
            f"rm -rf {jd} && mkdir -p {jd} {wd} || exit 1; "
            f"if command -v setsid >/dev/null 2>&1; then S=setsid; else S=; fi; "
            f"nohup $S sh -c {_q(wrapper)} fedblocks-job {_q(command)} {jd} {wd} "
            f"> {jd}/log 2>&1 < /dev/null & "
            # wait (bounded, ~10 s) for the wrapper to record its pid
            f"i=0; while [ ! -s {jd}/pid ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; cat {jd}/pid"
        )
        res = self.shell(script, 30)
        pid = _int_or_none(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "")
        if res.exit_code != 0 or pid is None or pid <= 1:
            raise DeviceError(f"{self.serial}: could not start job {job_id}: {(res.stderr or res.stdout).strip()[:200]}")
        return JobHandle(job_id=job_id, pid=pid, workdir=workdir, job_dir=job_dir)

    def poll_job(self, handle: JobHandle, log_lines: int = 20) -> JobStatus:
        """Where the job stands, from its files (safe to call after a reconnect)."""
        jd = _q(handle.job_dir)
        res = self._query(
            f"if [ -f {jd}/rc ]; then echo rc=$(cat {jd}/rc); "
            f"elif kill -0 {handle.pid} 2>/dev/null && grep -q {_q(handle.job_id)} /proc/{handle.pid}/cmdline 2>/dev/null; "
            f"then echo running; "
            # the wrapper may have written rc between the two checks: look once more
            f"elif [ -f {jd}/rc ]; then echo rc=$(cat {jd}/rc); else echo lost; fi; "
            f"echo ---; tail -n {int(log_lines)} {jd}/log 2>/dev/null",
            30,
        )
        head, _, tail = res.stdout.partition("---\n")
        head = head.strip()
        if head == "running":
            return JobStatus(True, None, tail, "running")
        if head.startswith("rc="):
            code = _int_or_none(head[3:])
            killed = self._query(f"test -f {jd}/killed").exit_code == 0
            return JobStatus(False, code, tail, "killed" if killed else "exited")
        return JobStatus(False, None, tail, "lost")

    def kill_job(self, handle: JobHandle, grace_s: float = 3.0) -> JobStatus:
        """TERM the job's process group, KILL it after ``grace_s``; returns the final status."""
        jd = _q(handle.job_dir)
        pid = int(handle.pid)
        ticks = max(1, int(grace_s / 0.1))
        script = (
            f"[ -f {jd}/rc ] && exit 0; "
            f"grep -q {_q(handle.job_id)} /proc/{pid}/cmdline 2>/dev/null || exit 0; "
            f"touch {jd}/killed; "
            # with setsid the wrapper leads its own group; otherwise kill its children too
            f"kill -TERM -{pid} 2>/dev/null || {{ pkill -TERM -P {pid} 2>/dev/null; kill -TERM {pid}; }}; "
            # a zombie has an empty cmdline: it counts as gone
            f"i=0; while grep -q {_q(handle.job_id)} /proc/{pid}/cmdline 2>/dev/null && [ $i -lt {ticks} ]; "
            f"do sleep 0.1; i=$((i+1)); done; "
            f"kill -KILL -{pid} 2>/dev/null || {{ pkill -KILL -P {pid} 2>/dev/null; kill -KILL {pid} 2>/dev/null; }}; "
            f"[ -f {jd}/rc ] || {{ echo 143 > {jd}/rc.tmp; mv {jd}/rc.tmp {jd}/rc; }}; exit 0"
        )
        self.shell(script, grace_s + 30, idempotent=True)
        return self.poll_job(handle)

    def wait_job(self, handle: JobHandle, timeout_s: float, poll_s: float = 0.5) -> JobStatus:
        """Poll until the job is no longer running; DeviceTimeout past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.poll_job(handle)
            if not status.running:
                return status
            if time.monotonic() >= deadline:
                raise DeviceTimeout(f"{self.serial}: job {handle.job_id} still running after {timeout_s:g} s")
            time.sleep(poll_s)
