"""Federated Shakespeare (one client per speaking role) as next-character classification.

Vocabulary (docs/data.md): id 0 = padding, ids 1..80 = LEAF's 80 characters in LEAF's
order, id 81 = out-of-vocabulary; num_classes = 82. A sample is the 80 characters before
a position (left-padded with 0 at a snippet's start), int64 of shape (80,), and its label
is the character at that position. Each snippet yields samples at its last character and
then every ``stride`` (default 80) characters before it, so a snippet of n characters gives
ceil((n - 1) / stride) samples and every character is context for at most one window.
Natural clients are the roles of the train file that yield at least one sample.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from fedblocks.host.data.dataset import DataMissingError, Dataset, remap_natural_clients, subset_indices
from fedblocks.host.errors import HostError

TRAIN_FILE = "shakespeare_train.h5"
TEST_FILE = "shakespeare_test.h5"
SEQ_LEN = 80
STRIDE = 80
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
PAD_ID = 0
OOV_ID = len(LEAF_LETTERS) + 1
VOCAB_SIZE = len(LEAF_LETTERS) + 2
CLASS_NAMES: tuple[str, ...] = ("<pad>", *LEAF_LETTERS, "<oov>")

_ASCII_TO_ID = np.full(128, OOV_ID, dtype=np.int64)
for _i, _ch in enumerate(LEAF_LETTERS):
    _ASCII_TO_ID[ord(_ch)] = _i + 1


def encode(text: str) -> np.ndarray:
    """Characters -> int64 ids (non-LEAF characters -> OOV)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
    ids = np.full(codes.shape, OOV_ID, dtype=np.int64)
    ascii_mask = codes < 128
    ids[ascii_mask] = _ASCII_TO_ID[codes[ascii_mask]]
    return ids


def decode(ids: np.ndarray) -> str:
    return "".join(CLASS_NAMES[i] if 0 < i <= len(LEAF_LETTERS) else "" for i in ids.tolist())


def windows(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, stride: int = STRIDE
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples of many snippets laid end to end in ``ids`` (snippet j = ids[starts[j]:starts[j]+lengths[j]]).

    Returns (windows (k, SEQ_LEN) int64, labels (k,) int64, snippet index (k,)), in snippet
    order and, within a snippet, in text order. Vectorised: 16,000 snippets take ~0.1 s.
    """
    counts = np.where(lengths >= 2, (lengths - 2) // stride + 1, 0)  # ceil((n - 1) / stride)
    snippet = np.repeat(np.arange(lengths.shape[0]), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.arange(snippet.shape[0]) - first  # 0..count-1 within the snippet
    target = lengths[snippet] - 1 - (counts[snippet] - 1 - k) * stride
    pos = starts[snippet] + target
    gather = pos[:, None] - SEQ_LEN + np.arange(SEQ_LEN)[None, :]
    inside = gather >= starts[snippet][:, None]
    out = np.where(inside, ids[np.maximum(gather, 0)], PAD_ID).astype(np.int64)
    return out, ids[pos].astype(np.int64), snippet


def snippet_samples(ids: np.ndarray, stride: int = STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """(windows (k, SEQ_LEN), next-char labels (k,)) for one snippet's ids."""
    x, y, _ = windows(ids, np.array([0]), np.array([ids.shape[0]]), stride)
    return x, y


def _read_roles(path: Path, stride: int) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    names: list[str] = []
    texts: list[str] = []
    role_of: list[int] = []
    try:
        with h5py.File(path, "r") as f:
            if "examples" not in f:
                raise HostError(f"{path}: no 'examples' group (want examples/<role>/snippets)")
            examples = f["examples"]
            for role in sorted(examples.keys()):
                group = examples[role]
                if not isinstance(group, h5py.Group) or "snippets" not in group:
                    raise HostError(f"{path}: role '{role}' has no 'snippets' dataset")
                for snippet in np.atleast_1d(group["snippets"][()]):
                    if not isinstance(snippet, bytes | np.bytes_):
                        raise HostError(f"{path}: role '{role}' snippets must be byte strings")
                    texts.append(bytes(snippet).decode("utf-8", "replace"))
                    role_of.append(len(names))
                names.append(role)
    except OSError as exc:
        raise HostError(f"{path}: cannot read the Shakespeare h5 file ({exc})") from None
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    x, y, snippet = windows(encode("".join(texts)), starts, lengths, stride)
    role = np.asarray(role_of, dtype=np.int64)[snippet]
    bounds = np.searchsorted(role, np.arange(len(names) + 1))  # samples are grouped by role
    xs = [x[bounds[r]:bounds[r + 1]] for r in range(len(names))]
    ys = [y[bounds[r]:bounds[r + 1]] for r in range(len(names))]
    return names, xs, ys


def load_shakespeare(
    data_dir: Path, limit_train: int | None = None, limit_test: int | None = None, stride: int = STRIDE
) -> Dataset:
    train_path, test_path = data_dir / TRAIN_FILE, data_dir / TEST_FILE
    for p in (train_path, test_path):
        if not p.is_file():
            raise DataMissingError(
                f"dataset shakespeare: expected {TRAIN_FILE} and {TEST_FILE} (TFF federated Shakespeare, "
                f"examples/<role>/snippets) in {data_dir}; {p.name} is missing"
            )
    if stride < 1:
        raise HostError(f"shakespeare stride must be a positive integer, got {stride}")
    names, xs, ys = _read_roles(train_path, stride)
    kept = [(n, x, y) for n, x, y in zip(names, xs, ys, strict=True) if y.shape[0] > 0]
    sizes = np.array([y.shape[0] for _, _, y in kept], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    natural = [np.arange(offsets[i], offsets[i + 1], dtype=np.int64) for i in range(len(kept))]
    x_train = np.concatenate([x for _, x, _ in kept]) if kept else np.zeros((0, SEQ_LEN), np.int64)
    y_train = np.concatenate([y for _, _, y in kept]) if kept else np.zeros((0,), np.int64)
    _, txs, tys = _read_roles(test_path, stride)
    x_test = np.concatenate(txs) if txs else np.zeros((0, SEQ_LEN), np.int64)
    y_test = np.concatenate(tys) if tys else np.zeros((0,), np.int64)
    tr = subset_indices(y_train.shape[0], limit_train)
    if tr is not None:
        natural = remap_natural_clients(natural, tr, y_train.shape[0])
        x_train, y_train = x_train[tr], y_train[tr]
    te = subset_indices(y_test.shape[0], limit_test)
    if te is not None:
        x_test, y_test = x_test[te], y_test[te]
    return Dataset(
        name="shakespeare",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=VOCAB_SIZE,
        input_shape=(SEQ_LEN,),
        class_names=CLASS_NAMES,
        natural_clients=natural,
        natural_client_names=[n for n, _, _ in kept],
        source=str(train_path),
        notes={"stride": str(stride)},
    )
