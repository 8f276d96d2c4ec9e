"""Split a train set's labels into per-client index arrays (iid, Dirichlet label skew, natural)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedblocks.host.errors import HostError

PartitionScheme = Literal["iid", "dirichlet", "natural"]
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "natural")
DEFAULT_MIN_SAMPLES = 10
MAX_DIRICHLET_ATTEMPTS = 1000


def partition(
    y: np.ndarray,
    num_clients: int,
    scheme: PartitionScheme | str,
    alpha: float = 0.5,
    seed: int = 0,
    samples_per_client: int | None = None,
    natural: list[np.ndarray] | None = None,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> list[np.ndarray]:
    """Per-client sorted int64 index arrays into ``y``; deterministic for a given seed.

    - iid: a seeded permutation cut into equal parts (or ``samples_per_client`` each).
    - dirichlet: label skew. Without samples_per_client, the standard per-class split
      (Hsu et al. 2019 / NIID-Bench): for each class, proportions ~ Dir(alpha) over the
      clients (clients already above the mean size get none), resampled until every client
      has >= min_samples. With samples_per_client, each client draws its class mix
      q ~ Dir(alpha) and takes exactly that many samples, without replacement, by q.
    - natural: the dataset's own clients (speakers, roles) with >= min_samples, a seeded
      choice of ``num_clients`` of them, each capped at samples_per_client.
    Clients never share a sample. Smaller alpha = stronger skew.
    """
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise HostError(f"partition: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise HostError(f"partition: number of clients must be a positive integer, got {num_clients!r}")
    if samples_per_client is not None and samples_per_client < 1:
        raise HostError(f"partition: samples_per_client must be positive, got {samples_per_client}")
    if min_samples < 0:
        raise HostError(f"partition: min_samples must be >= 0, got {min_samples}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(y.shape[0], num_clients, samples_per_client, rng)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise HostError(f"partition: alpha must be > 0, got {alpha}")
        if samples_per_client is None:
            parts = _dirichlet_split(y, num_clients, alpha, min_samples, rng)
        else:
            parts = _dirichlet_fixed_size(y, num_clients, alpha, samples_per_client, rng)
    elif scheme == "natural":
        parts = _natural(y.shape[0], num_clients, natural, samples_per_client, min_samples, rng)
    else:
        raise HostError(f"partition: unknown scheme '{scheme}' (choose {', '.join(PARTITION_SCHEMES)})")
    small = [i for i, p in enumerate(parts) if p.shape[0] < min_samples]
    if small:
        raise HostError(
            f"partition: client {small[0]} gets {parts[small[0]].shape[0]} samples, fewer than "
            f"min_samples={min_samples}; use fewer clients or a larger samples_per_client"
        )
    return [np.sort(p).astype(np.int64) for p in parts]


def _iid(n: int, num_clients: int, per_client: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    if per_client is None:
        return list(np.array_split(order, num_clients))
    if per_client * num_clients > n:
        raise HostError(
            f"partition: {num_clients} clients x {per_client} samples = {per_client * num_clients} > {n} available"
        )
    return [order[i * per_client:(i + 1) * per_client] for i in range(num_clients)]


def _dirichlet_split(
    y: np.ndarray, num_clients: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    n = y.shape[0]
    if n < num_clients * min_samples:
        raise HostError(f"partition: {n} samples cannot give {num_clients} clients {min_samples} each")
    classes = np.unique(y)
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for k in classes:
            idx_k = rng.permutation(np.flatnonzero(y == k))
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * (sizes < n / num_clients)  # balance: full clients take no more
            p = p / p.sum()
            cuts = (np.cumsum(p) * idx_k.shape[0]).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(idx_k, cuts)):
                buckets[j].append(piece)
                sizes[j] += piece.shape[0]
        if sizes.min() >= min_samples:
            return [np.concatenate(b) for b in buckets]
    raise HostError(
        f"partition: after {MAX_DIRICHLET_ATTEMPTS} Dirichlet draws (alpha={alpha}) some client still had fewer "
        f"than {min_samples} samples; raise alpha, lower min_samples or use fewer clients"
    )


def _dirichlet_fixed_size(
    y: np.ndarray, num_clients: int, alpha: float, per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if per_client * num_clients > y.shape[0]:
        raise HostError(
            f"partition: {num_clients} clients x {per_client} samples = {per_client * num_clients} > {y.shape[0]} available"
        )
    classes = np.unique(y)
    pools = [list(rng.permutation(np.flatnonzero(y == k))) for k in classes]
    left = np.array([len(p) for p in pools], dtype=np.int64)
    parts: list[np.ndarray] = []
    for _ in range(num_clients):
        q = rng.dirichlet(np.full(classes.shape[0], alpha))
        counts = np.zeros(classes.shape[0], dtype=np.int64)
        need = per_client
        while need > 0:  # draw by q; classes that ran out are dropped and q renormalised
            weights = q * (left - counts > 0)
            if weights.sum() <= 0:
                weights = (left - counts > 0).astype(np.float64)
            draw = rng.multinomial(need, weights / weights.sum())
            draw = np.minimum(draw, left - counts)
            counts += draw
            need -= int(draw.sum())
        chosen = []
        for c, count in enumerate(counts):
            chosen.extend(pools[c][:count])
            del pools[c][:count]
        left -= counts
        parts.append(np.array(chosen, dtype=np.int64))
    return parts


def _natural(
    n: int,
    num_clients: int,
    natural: list[np.ndarray] | None,
    per_client: int | None,
    min_samples: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    if natural is None:
        raise HostError("partition: scheme 'natural' needs a dataset with its own clients (fsdd, shakespeare)")
    for i, idx in enumerate(natural):
        idx = np.asarray(idx)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= n)):
            raise HostError(f"partition: natural client {i} has indices outside 0..{n - 1}")
    eligible = [i for i, idx in enumerate(natural) if len(idx) >= min_samples]
    if num_clients > len(eligible):
        raise HostError(
            f"partition: {num_clients} clients requested but the dataset has only {len(eligible)} natural "
            f"clients with >= {min_samples} samples"
        )
    picked = np.sort(rng.choice(len(eligible), size=num_clients, replace=False))
    parts = []
    for p in picked:
        idx = np.asarray(natural[eligible[p]], dtype=np.int64)
        if per_client is not None and idx.shape[0] > per_client:
            idx = rng.choice(idx, size=per_client, replace=False)
        parts.append(idx)
    return parts


def label_skew(y: np.ndarray, parts: list[np.ndarray], num_classes: int | None = None) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    0 = every client mirrors the global mix; 1 = clients hold disjoint classes.
    """
    k = int(num_classes if num_classes is not None else y.max() + 1)
    global_p = np.bincount(y, minlength=k) / max(1, y.shape[0])
    distances = []
    for idx in parts:
        if idx.shape[0] == 0:
            continue
        p = np.bincount(y[idx], minlength=k) / idx.shape[0]
        distances.append(0.5 * np.abs(p - global_p).sum())
    return float(np.mean(distances)) if distances else 0.0
