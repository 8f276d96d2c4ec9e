"""Datasets, partitioners and content-addressed client shards for the host.

Public API (see docs/data.md):
- ``load_dataset(name, data_dir=None, limit_train=None, limit_test=None) -> Dataset``
- ``load_configured_dataset(name, fallback, ...) -> Dataset`` (falls back when files are absent)
- ``partition(y, num_clients, scheme, ...) -> list[np.ndarray]``
- ``write_shard(x, y, out_dir, extra=None) -> ShardRef`` / ``read_shard(path, sha256=None)``
"""

from fedblocks.host.data.dataset import (
    DATASET_NAMES,
    NATURAL_CLIENT_DATASETS,
    DataMissingError,
    Dataset,
    cache_dir,
    resolve_data_dir,
)
from fedblocks.host.data.load import load_configured_dataset, load_dataset
from fedblocks.host.data.partition import PARTITION_SCHEMES, label_skew, partition
from fedblocks.host.data.shards import ShardRef, read_shard, write_shard

__all__ = [
    "DATASET_NAMES",
    "NATURAL_CLIENT_DATASETS",
    "PARTITION_SCHEMES",
    "DataMissingError",
    "Dataset",
    "ShardRef",
    "cache_dir",
    "label_skew",
    "load_configured_dataset",
    "load_dataset",
    "partition",
    "read_shard",
    "resolve_data_dir",
    "write_shard",
]
