"""adb key management: where the host key comes from, its format and permissions."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedblocks.testbed.adb import protocol
from fedblocks.testbed.errors import TestbedError
from fedblocks.testbed.keys import create_key, default_key, load_key, public_key_line


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("FEDBLOCKS_ADB_KEY", raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_created_key_is_private_and_android_formatted(home: Path) -> None:
    key = default_key()  # no ~/.android/adbkey: fedblocks creates its own
    assert key.path == home / ".config" / "fedblocks" / "adbkey"
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
    public = protocol.decode_android_pubkey(public_key_line(key))
    token = b"\x01" * protocol.TOKEN_SIZE
    assert protocol.verify_token_signature(public, token, key.signer().Sign(token))
    # a second call reuses it
    assert default_key().public_key == key.public_key


def test_platform_tools_key_is_preferred(home: Path) -> None:
    android = create_key(home / ".android" / "adbkey")
    assert default_key().path == android.path
    assert not (home / ".config" / "fedblocks" / "adbkey").exists()


def test_public_half_is_derived_when_pub_is_missing(home: Path) -> None:
    key = create_key(home / "k" / "adbkey")
    Path(str(key.path) + ".pub").unlink()
    again = load_key(key.path)
    assert again.public_key.split()[0] == key.public_key.split()[0]


def test_env_key_and_bad_keys(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = create_key(home / "lab" / "adbkey")
    monkeypatch.setenv("FEDBLOCKS_ADB_KEY", str(key.path))
    assert default_key().path == key.path
    monkeypatch.setenv("FEDBLOCKS_ADB_KEY", str(home / "missing"))
    with pytest.raises(TestbedError, match="does not exist"):
        default_key()
    junk = home / "junk"
    junk.write_text("not a key")
    Path(str(junk) + ".pub").write_text("x")
    with pytest.raises(TestbedError, match="cannot read the adb key"):
        load_key(junk).signer()
