"""A virtual phone's filesystem: a host directory standing in for the Android paths.

Android paths map onto the sandbox root by prefix (see ANDROID_PREFIXES):
- sync paths (push/pull/stat/list) always go through :meth:`Sandbox.to_host`, which
  refuses anything outside the mapped prefixes or resolving (via ``..`` or symlinks)
  outside the root;
- shell commands: in "namespace" mode (namespace.py) the processes see the Android
  paths themselves; in "rewrite" mode (no namespaces available) the prefixes are
  rewritten in the command text (:meth:`Sandbox.rewrite_command`), and paths a program
  builds at run time are found under ``$FEDBLOCKS_DEVICE_ROOT`` (docs/virtual_phones.md).
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import stat
import sys
import tempfile
from pathlib import Path

from ..errors import TestbedError
from .profiles import PhoneProfile

# Android path prefix -> path under the sandbox root. Longest prefix first.
ANDROID_PREFIXES: tuple[tuple[str, str], ...] = (
    ("/storage/emulated/0", "sdcard"),
    ("/storage/self/primary", "sdcard"),
    ("/sys/class/power_supply", "sys/class/power_supply"),
    ("/sys/class/thermal", "sys/class/thermal"),
    ("/data/local/tmp", "data/local/tmp"),
    ("/proc/meminfo", "proc/meminfo"),
    ("/sdcard", "sdcard"),
)
_SAFE_ROOT = re.compile(r"^[A-Za-z0-9_./-]+$")
# A prefix counts when it starts a word (not inside another path) and ends at a path boundary.
_COMMAND_PREFIX = re.compile(
    r"(?<![A-Za-z0-9_./-])(" + "|".join(re.escape(p) for p, _ in ANDROID_PREFIXES) + r")(?=[/\s'\";|&)<>`]|$)"
)


class SandboxEscape(Exception):
    """A device path that would leave the sandbox."""


class Sandbox:
    """The directory tree of one virtual phone."""

    def __init__(self, root: Path, profile: PhoneProfile, serial: str, python: str | None = None) -> None:
        root = Path(root).absolute()
        root.mkdir(parents=True, exist_ok=True)
        self.real_root = root.resolve()
        # The root is pasted into shell command text unquoted: it must need no quoting.
        if not _SAFE_ROOT.match(str(self.real_root)):
            link_dir = Path(tempfile.mkdtemp(prefix="fedblocks-vphone-"))
            (link_dir / "root").symlink_to(self.real_root)
            self.root = link_dir / "root"
        else:
            self.root = self.real_root
        self.profile = profile
        self.serial = serial
        self.python = python or sys.executable
        # "namespace": processes see the Android paths themselves (namespace.py);
        # "rewrite": Android path prefixes in command text are pointed at the sandbox.
        self.mode = "rewrite"

    # ------------------------------------------------------------------ layout
    @property
    def bin_dir(self) -> Path:
        return self.root / "system" / "bin"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "data" / "local" / "tmp"

    @property
    def lmk_log(self) -> Path:
        return self.tmp_dir / "fedblocks" / "lmk.log"

    @property
    def build_prop(self) -> Path:
        return self.root / "system" / "build.prop"

    def create(self) -> None:
        """Lay out the tree, the getprop/python3 commands and the static files."""
        for sub in ("data/local/tmp/fedblocks", "sdcard", "system/bin", "proc", "storage/emulated", "storage/self",
                    "sys/class/power_supply/battery", "sys/class/thermal/thermal_zone0"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # so that "$FEDBLOCKS_DEVICE_ROOT" + any Android path is the right file in rewrite mode too
        for alias in ("storage/emulated/0", "storage/self/primary"):
            link = self.root / alias
            if not link.is_symlink():
                link.symlink_to("../../sdcard")
        props = self.profile.properties()
        props["ro.serialno"] = self.serial
        self.build_prop.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        ram_kb = self.profile.ram_mb * 1024
        avail_kb = self.profile.memory_budget_mb * 1024
        (self.root / "proc" / "meminfo").write_text(
            f"MemTotal:       {ram_kb:>8} kB\nMemFree:        {avail_kb // 2:>8} kB\n"
            f"MemAvailable:   {avail_kb:>8} kB\nSwapTotal:             0 kB\nSwapFree:              0 kB\n")
        self._write_exe("getprop", _GETPROP.replace("@PROPS@", shlex.quote(str(self.build_prop))))
        self._write_exe("python3", f"#!/bin/sh\nexec {shlex.quote(self.python)} \"$@\"\n")
        self._write_exe("python", f"#!/bin/sh\nexec {shlex.quote(self.python)} \"$@\"\n")

    def _write_exe(self, name: str, text: str) -> None:
        path = self.bin_dir / name
        path.write_text(text)
        path.chmod(0o755)

    @property
    def command_cwd(self) -> str:
        return "/data/local/tmp" if self.mode == "namespace" else str(self.tmp_dir)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of every shell command: Android-like, nothing of the host's leaks."""
        android = self.mode == "namespace"
        env = {
            "PATH": f"{'/system/bin' if android else self.bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": self.command_cwd,
            "TMPDIR": self.command_cwd,
            "LANG": "C.UTF-8",
            "ANDROID_ROOT": "/system",
            "ANDROID_DATA": "/data",
            "EXTERNAL_STORAGE": "/sdcard",
            "TERM": "dumb",
            "FEDBLOCKS_DEVICE_ROOT": str(self.root),
            "FEDBLOCKS_SYSFS_ROOT": str(self.root),
            "FEDBLOCKS_VIRTUAL_SERIAL": self.serial,
        }
        if extra:
            env.update(extra)
        return env

    # ----------------------------------------------------------- path mapping
    def rewrite_command(self, command: str) -> str:
        """Point the Android prefixes in a shell command at the sandbox (unless the
        processes see the Android paths themselves, in namespace mode)."""
        if self.mode == "namespace":
            return command
        mapping = dict(ANDROID_PREFIXES)
        return _COMMAND_PREFIX.sub(lambda m: f"{self.root}/{mapping[m.group(1)]}", command)

    def to_host(self, device_path: str, *, for_write: bool = False) -> Path:
        """Map a sync path; raise SandboxEscape unless it stays inside the sandbox.

        Relative paths are taken from / (as adbd does). For writes the parent
        directory (created if missing) must resolve inside; the target itself is
        replaced by rename, so a symlink at the target is never followed.
        """
        if "\0" in device_path:
            raise SandboxEscape("path contains NUL")
        raw = device_path if device_path.startswith("/") else "/" + device_path
        if any(part == ".." for part in raw.split("/")):
            raise SandboxEscape(f"{device_path}: '..' is not allowed")
        norm = posixpath.normpath(raw)
        for prefix, sub in ANDROID_PREFIXES:
            if norm == prefix or norm.startswith(prefix + "/"):
                rest = norm[len(prefix):].lstrip("/")
                host = self.real_root / sub / rest if rest else self.real_root / sub
                break
        else:
            raise SandboxEscape(f"{device_path}: outside the phone's writable storage "
                                "(/data/local/tmp, /sdcard, /storage/emulated/0)")
        check = host.parent if for_write else host
        if for_write:
            if host == self.real_root / sub:
                raise SandboxEscape(f"{device_path}: is a directory")
            self._mkdirs_inside(check)
        resolved = Path(os.path.realpath(check))
        if resolved != self.real_root and self.real_root not in resolved.parents:
            raise SandboxEscape(f"{device_path}: resolves outside the sandbox")
        return host

    def _mkdirs_inside(self, directory: Path) -> None:
        """mkdir -p that refuses to create through a symlink leading out."""
        missing: list[Path] = []
        current = directory
        while not current.exists() and not current.is_symlink():
            missing.append(current)
            current = current.parent
        resolved = Path(os.path.realpath(current))
        if resolved != self.real_root and self.real_root not in resolved.parents:
            raise SandboxEscape(f"{directory}: resolves outside the sandbox")
        if not stat.S_ISDIR(os.stat(current).st_mode):
            raise SandboxEscape(f"{current.name}: not a directory")
        for path in reversed(missing):
            path.mkdir(mode=0o771)


def check_state_dir(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TestbedError(f"cannot create the state dir {path}: {exc.strerror}") from exc
    return path


# Android's getprop: no args lists "[key]: [value]"; a key prints its value (or the
# default given as 2nd arg, or an empty line).
_GETPROP = r"""#!/bin/sh
PROPS=@PROPS@
if [ $# -eq 0 ]; then
  while IFS='=' read -r k v; do printf '[%s]: [%s]\n' "$k" "$v"; done < "$PROPS"
  exit 0
fi
while IFS='=' read -r k v; do
  if [ "$k" = "$1" ]; then printf '%s\n' "$v"; exit 0; fi
done < "$PROPS"
if [ $# -ge 2 ]; then printf '%s\n' "$2"; else printf '\n'; fi
"""
