"""Fixtures for the host-side testbed tests: adb keys, virtual phones, devices.

Owned by the testbed host-side tests (device contract, adb backend, provisioning, load);
other testbed tests may add fixtures here (append, keep names distinct).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedblocks.testbed.keys import AdbKey, create_key

RESERVED = range(5555, 5586)  # the adb server probes these for emulators


def free_port() -> int:
    """A free localhost TCP port outside the adb emulator range."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in RESERVED and port >= 1024:
            return port


def _virtual() -> object:
    try:
        from fedblocks.testbed import virtual
    except ImportError as exc:  # the virtual phones are built by another part of the project
        pytest.skip(f"virtual phones not available yet (fedblocks.testbed.virtual: {exc})")
    return virtual


@pytest.fixture(autouse=True)
def private_device_registry(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep discovery away from virtual phones a user runs on this machine (testbed/virtual/registry.py)."""
    monkeypatch.setenv("FEDBLOCKS_CACHE", str(tmp_path_factory.getbasetemp() / "fedblocks-cache"))


@pytest.fixture(scope="session")
def adb_key(tmp_path_factory: pytest.TempPathFactory) -> AdbKey:
    return create_key(tmp_path_factory.mktemp("keys") / "adbkey")


@pytest.fixture(scope="session")
def stranger_key(tmp_path_factory: pytest.TempPathFactory) -> AdbKey:
    """A key no virtual phone trusts."""
    return create_key(tmp_path_factory.mktemp("stranger") / "adbkey")


PhoneFactory = Callable[..., object]


@pytest.fixture(scope="module")
def phone_factory(tmp_path_factory: pytest.TempPathFactory, adb_key: AdbKey) -> Iterator[PhoneFactory]:
    """start(profile="midrange") -> a running VirtualPhone trusting ``adb_key``; all stopped at teardown."""
    virtual = _virtual()
    state = tmp_path_factory.mktemp("phones")
    started: list[object] = []

    def start(profile: str = "midrange") -> object:
        phone = virtual.VirtualPhone(free_port(), virtual.load_profile(profile), state,  # type: ignore[attr-defined]
                                     [Path(str(adb_key.path) + ".pub")])
        phone.start()
        started.append(phone)
        return phone

    yield start
    for phone in started:
        phone.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def virtual_phone(phone_factory: PhoneFactory) -> object:
    return phone_factory()


@pytest.fixture(scope="session")
def pick_port() -> Callable[[], int]:
    """free_port as a fixture (test modules cannot import conftest)."""
    return free_port
