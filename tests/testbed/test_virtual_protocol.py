"""Unit tests: wire-protocol helpers, profiles, the sandbox path mapping."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from adb_shell import constants as adb_shell_constants
from adb_shell.adb_message import AdbMessage
from adb_shell.adb_message import checksum as adb_shell_checksum
from adb_shell.auth.keygen import encode_pubkey, keygen
from adb_shell.auth.sign_pythonrsa import PythonRSASigner
from vphone_support import load_private_key

from fedblocks.testbed.adb import protocol as p
from fedblocks.testbed.errors import TestbedError
from fedblocks.testbed.virtual import BUILTIN_PROFILES, load_profile
from fedblocks.testbed.virtual.sandbox import Sandbox, SandboxEscape


def test_message_matches_adb_shell_packing() -> None:
    payload = b"shell:echo hi\0"
    ours = p.pack_message(p.A_OPEN, 7, 0, payload)
    theirs = AdbMessage(adb_shell_constants.OPEN, 7, 0, payload).pack() + payload
    assert ours == theirs
    header = p.unpack_header(ours[: p.HEADER_SIZE])
    assert (header.command, header.arg0, header.arg1, header.data_length) == (p.A_OPEN, 7, 0, len(payload))
    assert header.data_check == adb_shell_checksum(payload) == p.checksum(payload)


def test_header_validation() -> None:
    good = p.pack_message(p.A_WRTE, 1, 2, b"x")[: p.HEADER_SIZE]
    bad_magic = good[:20] + b"\0\0\0\0"
    with pytest.raises(p.ProtocolError, match="magic"):
        p.unpack_header(bad_magic)
    huge = p.HEADER.pack(p.A_WRTE, 1, 2, p.MAX_PAYLOAD + 1, 0, p.A_WRTE ^ 0xFFFFFFFF)
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.unpack_header(huge)
    unknown = p.HEADER.pack(0x41414141, 0, 0, 0, 0, 0x41414141 ^ 0xFFFFFFFF)
    with pytest.raises(p.ProtocolError, match="unknown command"):
        p.unpack_header(unknown)


def test_banner_roundtrip_and_rejects_separators() -> None:
    raw = p.connect_banner({"ro.product.name": "a", "ro.product.model": "Model X"}, ["shell_v2", "cmd"])
    assert raw == b"device::ro.product.name=a;ro.product.model=Model X;features=shell_v2,cmd"
    banner = p.parse_banner(raw)
    assert banner.system_type == "device"
    assert banner.properties["ro.product.model"] == "Model X"
    assert banner.features == ("shell_v2", "cmd")
    with pytest.raises(ValueError):
        p.connect_banner({"ro.product.model": "a;b"}, [])


def test_service_names() -> None:
    assert p.parse_service(b"shell,v2,TERM=xterm,raw:ls -l\0") == p.ServiceRequest(
        "shell", ("v2", "TERM=xterm", "raw"), "ls -l")
    assert p.parse_service(b"shell:echo a:b\0") == p.ServiceRequest("shell", (), "echo a:b")
    assert p.parse_service(b"sync:\0") == p.ServiceRequest("sync", (), "")


def test_shell_packets_reassemble_across_arbitrary_splits() -> None:
    stream = p.shell_packet(1, b"hello") + p.shell_packet(2, b"") + p.shell_packet(3, b"\x07")
    for cut in range(1, len(stream)):
        reader = p.ShellPacketReader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == [(1, b"hello"), (2, b""), (3, b"\x07")]


def test_android_pubkey_decode_matches_adb_shell_and_verifies_signatures(tmp_path: Path) -> None:
    keygen(str(tmp_path / "k"))
    line = (tmp_path / "k.pub").read_text()
    public = p.decode_android_pubkey(line)
    private = load_private_key(tmp_path / "k")
    assert public.public_numbers() == private.public_key().public_numbers()
    # Encoding is the exact inverse, byte for byte what adb-shell (and adb) write.
    assert base64.b64decode(p.encode_android_pubkey(public)) == encode_pubkey(str(tmp_path / "k"))
    token = os.urandom(p.TOKEN_SIZE)
    signature = PythonRSASigner.FromRSAKeyPath(str(tmp_path / "k")).Sign(token)
    assert p.verify_token_signature(public, token, signature)
    assert p.verify_token_signature(public, token, p.sign_token(private, token))
    assert not p.verify_token_signature(public, os.urandom(p.TOKEN_SIZE), signature)
    with pytest.raises(p.KeyFormatError):
        p.decode_android_pubkey("bm90IGEga2V5 user@host")
    with pytest.raises(p.KeyFormatError):
        p.decode_android_pubkey("!!!")


def test_builtin_profiles_load() -> None:
    assert {"lowend-2gb", "midrange-4gb", "flagship-8gb", "pixel-6", "budget-3gb"} <= set(BUILTIN_PROFILES)
    for name in BUILTIN_PROFILES:
        profile = load_profile(name)
        assert 0 < profile.memory_budget_mb <= profile.ram_mb
        assert 0 < profile.cpu_speed <= 1
    assert load_profile("midrange").name == "midrange-4gb"


@pytest.mark.parametrize(("body", "message"), [
    ('[profile]\nname="x"\n', "missing required field 'model'"),
    ('[profile]\nname="x"\nmodel="m"\ndevice="d"\nmanufacturer="f"\nsoc="s"\nram_mb="lots"\n',
     "field 'ram_mb' must be an integer"),
    ('[profile]\nname="x"\nmodel="m;x"\ndevice="d"\nmanufacturer="f"\nsoc="s"\n', "field 'model'"),
    ('[profile]\nname="x"\nmodel="m"\ndevice="d"\nmanufacturer="f"\nsoc="s"\ncpu_speed=2.0\n',
     "field 'cpu_speed'=2.0 must be between"),
    ('[profile]\nname="x"\nmodel="m"\ndevice="d"\nmanufacturer="f"\nsoc="s"\nwifi=true\n', "unknown field 'wifi'"),
    ("[profile\n", "invalid TOML"),
])
def test_bad_profile_names_the_field(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(body)
    with pytest.raises(TestbedError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_profile(path)


def test_custom_profile_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('name="lab-a"\nmodel="Lab A"\ndevice="laba"\nmanufacturer="Lab"\nsoc="X1"\nram_mb=3000\n')
    profile = load_profile(path)
    assert profile.ram_mb == 3000 and profile.memory_budget_mb == 1350


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    box = Sandbox(tmp_path / "root", load_profile("midrange"), "127.0.0.1:1")
    box.create()
    return box


def test_sync_path_mapping(sandbox: Sandbox, tmp_path: Path) -> None:
    root = sandbox.real_root
    assert sandbox.to_host("/data/local/tmp/a/b") == root / "data/local/tmp/a/b"
    assert sandbox.to_host("/sdcard/x") == root / "sdcard/x"
    assert sandbox.to_host("/storage/emulated/0/x") == root / "sdcard/x"
    assert sandbox.to_host("data/local/tmp/rel") == root / "data/local/tmp/rel"
    for bad in ("/data/local/tmp/../../../etc/passwd", "/etc/passwd", "/data/local/tmpx", "/", "/data",
                "../../etc/passwd", "/data/local/tmp/a\0b"):
        with pytest.raises(SandboxEscape):
            sandbox.to_host(bad)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "data/local/tmp/link").symlink_to(outside)
    with pytest.raises(SandboxEscape):
        sandbox.to_host("/data/local/tmp/link/file", for_write=True)
    with pytest.raises(SandboxEscape):
        sandbox.to_host("/data/local/tmp/link/file")
    with pytest.raises(SandboxEscape):
        sandbox.to_host("/data/local/tmp/link/new/dir/file", for_write=True)
    assert not (outside / "new").exists()


def test_command_rewriting(sandbox: Sandbox) -> None:
    root = sandbox.root
    assert sandbox.rewrite_command("ls /data/local/tmp/x; cat '/sdcard/a b'") == \
        f"ls {root}/data/local/tmp/x; cat '{root}/sdcard/a b'"
    assert sandbox.rewrite_command("cd /data/local/tmp && cat /proc/meminfo") == \
        f"cd {root}/data/local/tmp && cat {root}/proc/meminfo"
    # Not a prefix match inside other words or paths.
    assert sandbox.rewrite_command("echo /x/data/local/tmp /sdcardx") == "echo /x/data/local/tmp /sdcardx"
