"""The RSA key the host signs adb AUTH tokens with.

Order: ``$FEDBLOCKS_ADB_KEY`` (a private key path) if set; else ``~/.android/adbkey``
(the key the platform-tools ``adb`` already uses, so phones that trust your adb trust
fedblocks too); else ``$XDG_CONFIG_HOME/fedblocks/adbkey`` (default ~/.config/...),
created on first use with its ``.pub`` in Android's format, private key mode 0600.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from adb_shell.auth.keygen import encode_pubkey, get_user_info, keygen
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from .errors import TestbedError

KEY_ENV = "FEDBLOCKS_ADB_KEY"


def android_key_path() -> Path:
    return Path.home() / ".android" / "adbkey"


def fedblocks_key_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "fedblocks" / "adbkey"


@dataclass(frozen=True)
class AdbKey:
    """A private key file and its public half in Android's format (``base64 user@host``)."""

    path: Path
    public_key: bytes

    def signer(self) -> AdbSigner:
        return AdbSigner(self)


class AdbSigner:
    """The signer interface adb-shell's connect() expects (Sign / GetPublicKey)."""

    def __init__(self, key: AdbKey) -> None:
        self.key = key
        try:
            loaded = serialization.load_pem_private_key(key.path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise TestbedError(f"cannot read the adb key {key.path}: {exc}") from exc
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise TestbedError(f"the adb key {key.path} is not an RSA private key")
        self._private = loaded

    def Sign(self, data: bytes) -> bytes:  # adb-shell's method name
        # adbd hands out a 20-byte token and verifies it as a SHA-1 digest
        return self._private.sign(bytes(data), padding.PKCS1v15(), utils.Prehashed(hashes.SHA1()))

    def GetPublicKey(self) -> bytes:  # adb-shell's method name
        return self.key.public_key


def create_key(path: Path) -> AdbKey:
    """Write a new 2048-bit key at ``path`` (mode 0600) and ``path.pub``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # create the file 0600 first: keygen() opens it with plain open(), which keeps the mode
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    keygen(str(path))
    return load_key(path)


def load_key(path: Path) -> AdbKey:
    """Load a private key; the public half comes from ``path.pub`` or is derived."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TestbedError(f"adb key {path} does not exist (unset {KEY_ENV} or point it at an adbkey file)")
    pub_path = Path(str(path) + ".pub")
    if pub_path.is_file():
        public = pub_path.read_bytes().strip()
    else:
        try:
            public = base64.b64encode(encode_pubkey(str(path))) + get_user_info().encode()
        except (ValueError, TypeError) as exc:
            raise TestbedError(f"cannot read the adb key {path}: {exc}") from exc
    return AdbKey(path=path, public_key=public)


def default_key() -> AdbKey:
    """The key this host signs with (see the module docstring for the order)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return load_key(Path(env))
    if android_key_path().is_file():
        return load_key(android_key_path())
    ours = fedblocks_key_path()
    return load_key(ours) if ours.is_file() else create_key(ours)


def public_key_line(key: AdbKey) -> str:
    """The line a phone (or a virtual phone's authorized_keys file) stores for this key."""
    return key.public_key.decode("ascii", "replace").strip()
