"""Give a phone's adbd (and so every process it starts) an Android-shaped filesystem view.

In a private mount namespace, a new root is assembled on a tmpfs: every top-level entry
of the host's / is bind-mounted at the same path (so the venv, /tmp, the sandbox itself
stay where they are), then the phone's sandbox is bound at the Android paths:
/data/local/tmp, /sdcard, /storage/emulated/0, /storage/self/primary, /system, and over
/sys/class/power_supply, /sys/class/thermal and /proc/meminfo. adbd chroots into it
before it starts any thread. Commands then see /data/local/tmp as their cwd, and absolute
Android paths inside files (job.json) just work, with no command rewriting.

Needs CAP_SYS_ADMIN (root, as in CI) or unprivileged user namespaces; otherwise
:func:`enter_phone_namespace` returns False and the phone falls back to rewriting path
prefixes (sandbox.py). ``FEDBLOCKS_VPHONE_NAMESPACE=0`` forces the fallback.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
ENV_SWITCH = "FEDBLOCKS_VPHONE_NAMESPACE"

# Android path -> path under the sandbox root (directories unless noted).
BINDS: tuple[tuple[str, str], ...] = (
    ("/data/local/tmp", "data/local/tmp"),
    ("/sdcard", "sdcard"),
    ("/storage/emulated/0", "sdcard"),
    ("/storage/self/primary", "sdcard"),
    ("/system", "system"),
    ("/sys/class/power_supply", "sys/class/power_supply"),
    ("/sys/class/thermal", "sys/class/thermal"),
    ("/proc/meminfo", "proc/meminfo"),   # a file
)

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(OSError):
    pass


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def _unshare(flags: int) -> bool:
    return _libc.unshare(flags) == 0


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_mount_namespace() -> None:
    if _unshare(CLONE_NEWNS):
        return
    # Not privileged: try an unprivileged user namespace that maps our own uid/gid.
    uid, gid = os.getuid(), os.getgid()
    if not _unshare(CLONE_NEWUSER | CLONE_NEWNS):
        err = ctypes.get_errno()
        raise NamespaceError(err, f"unshare: {os.strerror(err)}")
    try:
        _write("/proc/self/setgroups", "deny")
    except OSError:
        pass
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")


def enter_phone_namespace(sandbox_root: Path, new_root: Path) -> bool:
    """Build the phone's view and chroot into it; call before starting any thread.

    Returns False (and changes nothing visible) when namespaces are unavailable.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    sandbox_root = Path(os.path.realpath(sandbox_root))
    new_root.mkdir(parents=True, exist_ok=True)
    try:
        _enter_mount_namespace()
    except OSError:
        return False
    # From here on we are alone in our namespace: failures leave the host untouched.
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount("tmpfs", str(new_root), "tmpfs", MS_NOSUID, "mode=755")
        for name in sorted(os.listdir("/")):
            source = "/" + name
            target = os.path.join(new_root, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), target)
            elif os.path.isdir(source):
                os.mkdir(target)
                _mount(source, target, None, MS_BIND | MS_REC)
            elif os.path.isfile(source):
                open(target, "w").close()
                _mount(source, target, None, MS_BIND)
        for android_path, sub in BINDS:
            source = sandbox_root / sub
            target = str(new_root) + android_path
            if source.is_dir():
                os.makedirs(target, exist_ok=True)
            elif not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "w").close()
            _mount(str(source), target, None, MS_BIND)
        os.chroot(new_root)   # the last step: any failure above leaves us un-chrooted
        os.chdir("/")
    except OSError as exc:
        # Everything so far is private to this process's namespace: fall back to rewriting.
        import sys

        print(f"namespace: cannot build the phone's filesystem view ({exc}); rewriting paths instead",
              file=sys.stderr, flush=True)
        return False
    return True
