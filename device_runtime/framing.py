"""SmartSplit wire framing: activations, labels and gradients between a phone and the server.

Both sides import this module (the host's edge server imports it from the device
runtime, which may import nothing of the host). One frame:

    offset size
    0      4    magic b"FBSP"
    4      1    version (1)
    5      1    message type (MSG_*)
    6      1    dtype code (DTYPE_*)
    7      1    ndim (0..8)
    8      4    step (uint32): the batch the frame belongs to
    12     8    payload length in bytes (uint64)
    20     4*n  shape, one uint32 per dimension
    ...    len  payload: the array's bytes, C order, little-endian (JSON messages: UTF-8)
    ...    4    CRC-32 (zlib) of everything before it

all little-endian: 24 + 4 x ndim bytes of overhead per frame. Everything is validated on
arrival, before a byte of payload is read: magic, version (a newer one is refused), a
known message type with the dtype and rank it must have, shape dims within limits,
payload length = product(shape) x itemsize and within the reader's size limit; then the
CRC, then (for float arrays) that every value is finite, and what the caller expects
(step, shape). A bad frame raises FrameError with one line saying what is wrong; the
connection is then unusable (the stream position is lost) and the caller closes it.

Conversation (device -> server / server -> device):
    HELLO {job_id, token, cut, batch_size, steps, activation_shape, engine}  ->  WELCOME {} | ERROR
    per step i: ACTIVATION(i, z float32), LABELS(i, y int64)  ->  GRADIENT(i, dL/dz float32), LOSS(i, scalar)
    DONE {steps}  ->  ACK {}
"""

from __future__ import annotations

import json
import math
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"FBSP"
VERSION = 1
HEADER = struct.Struct("<4sBBBBIQ")
CRC = struct.Struct("<I")
MAX_NDIM = 8
MAX_DIM = 2**31 - 1
MAX_JSON_BYTES = 64 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024 * 1024

MSG_HELLO, MSG_WELCOME, MSG_ACTIVATION, MSG_LABELS, MSG_GRADIENT, MSG_LOSS, MSG_DONE, MSG_ACK, MSG_ERROR = range(1, 10)
MSG_NAMES = {MSG_HELLO: "HELLO", MSG_WELCOME: "WELCOME", MSG_ACTIVATION: "ACTIVATION", MSG_LABELS: "LABELS",
             MSG_GRADIENT: "GRADIENT", MSG_LOSS: "LOSS", MSG_DONE: "DONE", MSG_ACK: "ACK", MSG_ERROR: "ERROR"}
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_UTF8 = 1, 2, 3
DTYPES = {DTYPE_FLOAT32: np.dtype("<f4"), DTYPE_INT64: np.dtype("<i8"), DTYPE_UTF8: np.dtype("u1")}
JSON_MESSAGES = (MSG_HELLO, MSG_WELCOME, MSG_DONE, MSG_ACK, MSG_ERROR)
# message type -> (dtype code it must carry, rank it must have or None for any)
_RULES: dict[int, tuple[int, int | None]] = {
    **{m: (DTYPE_UTF8, 1) for m in JSON_MESSAGES},
    MSG_ACTIVATION: (DTYPE_FLOAT32, None), MSG_GRADIENT: (DTYPE_FLOAT32, None),
    MSG_LABELS: (DTYPE_INT64, 1), MSG_LOSS: (DTYPE_FLOAT32, 0),
}


class FrameError(ValueError):
    """A frame that is malformed, corrupt, too large or not what the conversation expects."""


class PeerClosed(ConnectionError):
    """The other side closed the connection (or it broke) before a whole frame arrived."""


def overhead_bytes(ndim: int) -> int:
    """Framing bytes around a payload of rank `ndim`."""
    return HEADER.size + 4 * ndim + CRC.size


@dataclass(frozen=True)
class Frame:
    kind: int
    step: int
    array: np.ndarray | None = None  # array messages
    meta: dict[str, Any] | None = None  # JSON messages
    wire_bytes: int = 0

    @property
    def name(self) -> str:
        return MSG_NAMES.get(self.kind, str(self.kind))


def _dtype_code(array: np.ndarray) -> int:
    for code, dtype in DTYPES.items():
        if array.dtype == dtype or array.dtype == dtype.newbyteorder("="):
            return code
    raise FrameError(f"cannot frame an array of dtype {array.dtype} (float32, int64 only)")


def _array_parts(kind: int, step: int, array: np.ndarray) -> tuple[bytes, memoryview]:
    """(header + shape, payload view) of an array frame; the payload is not copied when the array
    already is C-contiguous little-endian (a phone sends its activations without a second copy)."""
    code = _dtype_code(array)
    expected, rank = _RULES[kind]
    if code != expected or (rank is not None and array.ndim != rank):
        raise FrameError(f"{MSG_NAMES[kind]} must carry {DTYPES[expected]} of rank {rank}, "
                         f"got {array.dtype} of rank {array.ndim}")
    flat = np.ascontiguousarray(array, dtype=DTYPES[code]).reshape(-1).view(np.uint8)
    return _head(kind, code, step, tuple(array.shape), flat.nbytes), memoryview(flat)


def encode_array(kind: int, step: int, array: np.ndarray) -> bytes:
    """One frame carrying `array` (float32 or int64, converted to little-endian)."""
    head, payload = _array_parts(kind, step, array)
    body = head + bytes(payload)
    return body + CRC.pack(zlib.crc32(body))


def encode_json(kind: int, step: int, meta: dict[str, Any]) -> bytes:
    payload = json.dumps(meta, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(payload) > MAX_JSON_BYTES:
        raise FrameError(f"{MSG_NAMES[kind]} message is {len(payload)} bytes, over {MAX_JSON_BYTES}")
    return _frame(kind, DTYPE_UTF8, step, (len(payload),), payload)


def _head(kind: int, code: int, step: int, shape: tuple[int, ...], length: int) -> bytes:
    if not 0 <= step <= 0xFFFFFFFF:
        raise FrameError(f"step {step} out of range")
    return HEADER.pack(MAGIC, VERSION, kind, code, len(shape), step, length) + struct.pack(f"<{len(shape)}I", *shape)


def _frame(kind: int, code: int, step: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    body = _head(kind, code, step, shape, len(payload)) + payload
    return body + CRC.pack(zlib.crc32(body))


def check_header(raw: bytes, max_payload_bytes: int) -> tuple[int, int, int, int, int]:
    """(kind, dtype code, ndim, step, payload length) of a header; FrameError when it is bad."""
    magic, version, kind, code, ndim, step, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"not a fedblocks split frame (magic {magic!r}, expected {MAGIC!r})")
    if version > VERSION or version < 1:
        raise FrameError(f"frame version {version} is not supported (this side speaks {VERSION})")
    if kind not in _RULES:
        raise FrameError(f"unknown message type {kind}")
    if code not in DTYPES:
        raise FrameError(f"{MSG_NAMES[kind]}: unknown dtype code {code}")
    expected, rank = _RULES[kind]
    if code != expected:
        raise FrameError(f"{MSG_NAMES[kind]}: dtype {DTYPES[code]} not allowed (expected {DTYPES[expected]})")
    if ndim > MAX_NDIM or (rank is not None and ndim != rank):
        raise FrameError(f"{MSG_NAMES[kind]}: rank {ndim} not allowed")
    limit = MAX_JSON_BYTES if kind in JSON_MESSAGES else max_payload_bytes
    if length > limit:
        raise FrameError(f"{MSG_NAMES[kind]}: payload of {length} bytes is over the limit of {limit}")
    return kind, code, ndim, step, length


def check_shape(kind: int, code: int, shape: tuple[int, ...], length: int) -> None:
    if any(d > MAX_DIM for d in shape):
        raise FrameError(f"{MSG_NAMES[kind]}: dimension over {MAX_DIM} in shape {list(shape)}")
    if math.prod(shape) * DTYPES[code].itemsize != length:
        raise FrameError(f"{MSG_NAMES[kind]}: shape {list(shape)} of {DTYPES[code]} does not match the payload "
                         f"length {length}")


def all_finite(array: np.ndarray) -> bool:
    """Every value finite, without np.isfinite's bool array (a quarter of a float32 payload, on
    a phone whose largest buffer is that activation): a float64 sum of float32 values cannot
    overflow (2^64 elements x 3.4e38 < 1.8e308), and one NaN or infinity makes it non-finite.
    numpy reduces through small cast buffers (measured: 65 KB of temporaries for 8 MB)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.isfinite(np.sum(array, dtype=np.float64)))


def _finish(kind: int, code: int, step: int, shape: tuple[int, ...], payload: bytes | bytearray, wire: int) -> Frame:
    if kind in JSON_MESSAGES:
        try:
            meta = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FrameError(f"{MSG_NAMES[kind]}: payload is not UTF-8 JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise FrameError(f"{MSG_NAMES[kind]}: payload must be a JSON object")
        return Frame(kind, step, meta=meta, wire_bytes=wire)
    array = np.frombuffer(payload, dtype=DTYPES[code]).reshape(shape)
    if code == DTYPE_FLOAT32 and not all_finite(array):
        raise FrameError(f"{MSG_NAMES[kind]} (step {step}): contains NaN or infinite values")
    return Frame(kind, step, array=array.astype(array.dtype.newbyteorder("="), copy=False), wire_bytes=wire)


def decode(data: bytes, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Frame:
    """One complete frame from bytes (validated); FrameError for anything wrong or trailing."""
    if len(data) < HEADER.size + CRC.size:
        raise FrameError(f"frame of {len(data)} bytes is shorter than a header")
    kind, code, ndim, step, length = check_header(data[:HEADER.size], max_payload_bytes)
    dims_end = HEADER.size + 4 * ndim
    total = dims_end + length + CRC.size
    if len(data) != total:
        raise FrameError(f"{MSG_NAMES[kind]}: frame is {len(data)} bytes, its header says {total}")
    shape = struct.unpack(f"<{ndim}I", data[HEADER.size:dims_end])
    check_shape(kind, code, shape, length)
    body = data[:dims_end + length]
    (crc,) = CRC.unpack(data[dims_end + length:])
    if zlib.crc32(body) != crc:
        raise FrameError(f"{MSG_NAMES[kind]} (step {step}): checksum mismatch (corrupted in transit)")
    return _finish(kind, code, step, shape, data[dims_end:dims_end + length], total)


class FrameSocket:
    """A connected socket speaking frames; counts bytes both ways. One reader, one writer."""

    def __init__(self, sock: socket.socket, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 timeout_s: float | None = 300.0) -> None:
        self.sock = sock
        self.max_payload_bytes = max_payload_bytes
        self.sock.settimeout(timeout_s)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.frames_received = 0
        self.wait_s = 0.0  # time spent blocked in recv (network + the peer's compute)

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float = 30.0, io_timeout_s: float | None = 300.0,
                max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> FrameSocket:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, max_payload_bytes, io_timeout_s)

    def send(self, frame: bytes) -> None:
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            raise PeerClosed(f"connection lost while sending ({exc})") from None
        self.bytes_sent += len(frame)
        self.frames_sent += 1

    def send_array(self, kind: int, step: int, array: np.ndarray) -> None:
        head, payload = _array_parts(kind, step, array)
        crc = CRC.pack(zlib.crc32(payload, zlib.crc32(head)))
        try:
            for part in (head, payload, crc):
                self.sock.sendall(part)
        except OSError as exc:
            raise PeerClosed(f"connection lost while sending ({exc})") from None
        self.bytes_sent += len(head) + payload.nbytes + len(crc)
        self.frames_sent += 1

    def send_json(self, kind: int, step: int, meta: dict[str, Any]) -> None:
        self.send(encode_json(kind, step, meta))

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError:
                raise PeerClosed(f"no data from the peer for {self.sock.gettimeout()} s") from None
            except OSError as exc:
                raise PeerClosed(f"connection lost while receiving ({exc})") from None
            if k == 0:
                raise PeerClosed("the peer closed the connection")
            got += k
        return buf  # mutable: arrays decoded from it are writable, without another copy

    def recv(self, expect: int | tuple[int, ...] | None = None, step: int | None = None,
             shape: tuple[int, ...] | None = None) -> Frame:
        """The next frame, validated; `expect` (types), `step` and `shape` are checked too.

        An ERROR frame is returned as is when ERROR is expected, else raised as FrameError
        with the peer's reason.
        """
        t0 = time.monotonic()
        head = self._recv_exact(HEADER.size)
        self.wait_s += time.monotonic() - t0
        kind, code, ndim, frame_step, length = check_header(bytes(head), self.max_payload_bytes)
        dims = self._recv_exact(4 * ndim)
        frame_shape = struct.unpack(f"<{ndim}I", dims)
        check_shape(kind, code, frame_shape, length)
        payload = self._recv_exact(length)
        (crc,) = CRC.unpack(self._recv_exact(CRC.size))
        if zlib.crc32(payload, zlib.crc32(bytes(head) + bytes(dims))) != crc:
            raise FrameError(f"{MSG_NAMES[kind]} (step {frame_step}): checksum mismatch (corrupted in transit)")
        wire = HEADER.size + len(dims) + length + CRC.size
        self.bytes_received += wire
        self.frames_received += 1
        frame = _finish(kind, code, frame_step, frame_shape, payload, wire)
        wanted = (expect,) if isinstance(expect, int) else expect
        if wanted is not None and kind not in wanted:
            if kind == MSG_ERROR:
                reason = str((frame.meta or {}).get("reason", "no reason given"))[:300]
                raise FrameError(f"peer reported an error: {reason}")
            names = "/".join(MSG_NAMES[w] for w in wanted)
            raise FrameError(f"expected {names}, got {MSG_NAMES[kind]}")
        if step is not None and frame_step != step:
            raise FrameError(f"{MSG_NAMES[kind]}: frame for step {frame_step}, expected step {step}")
        if shape is not None and frame_shape != tuple(shape):
            raise FrameError(f"{MSG_NAMES[kind]}: shape {list(frame_shape)}, expected {list(shape)}")
        return frame

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
