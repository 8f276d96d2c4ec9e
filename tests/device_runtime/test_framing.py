"""SmartSplit wire framing: round trips, and every kind of bad frame is refused with one line."""

from __future__ import annotations

import socket
import struct
import threading
import zlib

import numpy as np
import pytest

from fedblocks.device_runtime import framing as f


def _recrc(data: bytes) -> bytes:
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_round_trip_arrays_and_json() -> None:
    z = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    frame = f.decode(f.encode_array(f.MSG_ACTIVATION, 7, z))
    assert frame.kind == f.MSG_ACTIVATION and frame.step == 7 and np.array_equal(frame.array, z)
    assert frame.wire_bytes == z.nbytes + f.overhead_bytes(4)
    y = f.decode(f.encode_array(f.MSG_LABELS, 7, np.arange(5, dtype=np.int64)))
    assert y.array.dtype == np.int64 and list(y.array) == [0, 1, 2, 3, 4]
    loss = f.decode(f.encode_array(f.MSG_LOSS, 1, np.asarray(2.5, dtype=np.float32)))
    assert float(loss.array) == 2.5 and loss.array.shape == ()
    hello = f.decode(f.encode_json(f.MSG_HELLO, 0, {"job_id": "j", "token": "t"}))
    assert hello.meta == {"job_id": "j", "token": "t"}


def _bad_frames() -> dict[str, tuple[bytes, str]]:
    good = f.encode_array(f.MSG_GRADIENT, 3, np.ones((2, 2), dtype=np.float32))
    nan = np.ones((2, 2), dtype=np.float32)
    nan[0, 1] = np.nan
    cases = {
        "magic": (b"XXXX" + good[4:], "magic"),
        "newer version": (_recrc(good[:4] + bytes([2]) + good[5:]), "version 2"),
        "unknown type": (_recrc(good[:5] + bytes([99]) + good[6:]), "unknown message type"),
        "dtype for type": (_recrc(good[:6] + bytes([f.DTYPE_INT64]) + good[7:]), "not allowed"),
        "crc": (good[:-5] + bytes([good[-5] ^ 1]) + good[-4:], "checksum"),
        "trailing bytes": (good + b"\0", "header says"),
        "truncated": (good[:10], "shorter than a header"),
        "nan": (_raw_frame(f.MSG_GRADIENT, f.DTYPE_FLOAT32, (2, 2), nan.tobytes()), "NaN"),
        "length vs shape": (_raw_frame(f.MSG_ACTIVATION, f.DTYPE_FLOAT32, (2, 3), b"\0" * 20), "does not match"),
        "labels rank": (_raw_frame(f.MSG_LABELS, f.DTYPE_INT64, (2, 2), b"\0" * 32), "rank 2"),
        "loss not scalar": (_raw_frame(f.MSG_LOSS, f.DTYPE_FLOAT32, (1,), b"\0" * 4), "rank 1"),
        "json not object": (_raw_frame(f.MSG_HELLO, f.DTYPE_UTF8, (2,), b"[]"), "JSON object"),
        "json not utf8": (_raw_frame(f.MSG_HELLO, f.DTYPE_UTF8, (2,), b"\xff\xfe"), "UTF-8"),
    }
    return cases


def _raw_frame(kind: int, code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    head = f.HEADER.pack(f.MAGIC, f.VERSION, kind, code, len(shape), 3, len(payload))
    head += struct.pack(f"<{len(shape)}I", *shape)
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


@pytest.mark.parametrize("case", sorted(_bad_frames()))
def test_bad_frames_are_refused(case: str) -> None:
    data, needle = _bad_frames()[case]
    with pytest.raises(f.FrameError) as info:
        f.decode(data)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_size_limit_is_checked_before_the_payload_is_read() -> None:
    a, b = socket.socketpair()
    try:
        # a header claiming 1 GiB, and nothing else: the reader must refuse it at once
        a.sendall(f.HEADER.pack(f.MAGIC, f.VERSION, f.MSG_ACTIVATION, f.DTYPE_FLOAT32, 1, 0, 2**30)
                  + struct.pack("<I", 2**28))
        reader = f.FrameSocket(b, max_payload_bytes=1024 * 1024, timeout_s=5)
        with pytest.raises(f.FrameError, match="over the limit"):
            reader.recv()
        # JSON messages have their own, small limit
        with pytest.raises(f.FrameError, match="over"):
            f.encode_json(f.MSG_HELLO, 0, {"x": "y" * (f.MAX_JSON_BYTES + 1)})
    finally:
        a.close()
        b.close()


def test_socket_checks_what_the_conversation_expects() -> None:
    a, b = socket.socketpair()
    writer, reader = f.FrameSocket(a, timeout_s=5), f.FrameSocket(b, timeout_s=5)
    try:
        g = np.zeros((2, 3), dtype=np.float32)
        writer.send_array(f.MSG_GRADIENT, 4, g)
        assert reader.recv(f.MSG_GRADIENT, step=4, shape=(2, 3)).step == 4
        writer.send_array(f.MSG_GRADIENT, 5, g)
        with pytest.raises(f.FrameError, match="expected step 6"):
            reader.recv(f.MSG_GRADIENT, step=6)
        writer.send_array(f.MSG_GRADIENT, 6, g)
        with pytest.raises(f.FrameError, match=r"expected \[2, 4\]"):
            reader.recv(f.MSG_GRADIENT, shape=(2, 4))
        writer.send_array(f.MSG_GRADIENT, 7, g)
        with pytest.raises(f.FrameError, match="expected LOSS, got GRADIENT"):
            reader.recv(f.MSG_LOSS)
        writer.send_json(f.MSG_ERROR, 0, {"reason": "no session for this token"})
        with pytest.raises(f.FrameError, match="peer reported an error: no session"):
            reader.recv(f.MSG_WELCOME)
        assert writer.frames_sent == 5 and reader.frames_received == 5
        assert reader.bytes_received == writer.bytes_sent
        writer.close()
        with pytest.raises(f.PeerClosed):
            reader.recv()
    finally:
        reader.close()


def test_frames_split_across_reads_arrive_whole() -> None:
    a, b = socket.socketpair()
    data = f.encode_array(f.MSG_ACTIVATION, 1, np.arange(1000, dtype=np.float32).reshape(10, 100))

    def trickle() -> None:
        for i in range(0, len(data), 333):
            a.sendall(data[i:i + 333])

    t = threading.Thread(target=trickle)
    t.start()
    frame = f.FrameSocket(b, timeout_s=5).recv(f.MSG_ACTIVATION)
    t.join()
    a.close()
    b.close()
    assert frame.array.shape == (10, 100) and frame.array[9, 99] == 999


def test_finiteness_check_has_no_false_verdicts_at_the_extremes() -> None:
    """all_finite sums in float64 instead of building np.isfinite's bool array: the largest
    float32 values must not overflow it, and every kind of non-finite value must show."""
    big = np.full((4, 1024), np.finfo(np.float32).max, dtype=np.float32)
    assert f.all_finite(big) and f.all_finite(-big) and f.all_finite(np.zeros((0,), dtype=np.float32))
    for bad in ([np.inf], [-np.inf], [np.inf, -np.inf], [np.nan], [np.finfo(np.float32).max, np.nan]):
        a = np.ones(4096, dtype=np.float32)
        a[7:7 + len(bad)] = bad
        assert not f.all_finite(a), bad
