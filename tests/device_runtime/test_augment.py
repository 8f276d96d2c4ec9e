"""Crop-and-flip augmentation: the image operation, its draws, and which stages it may touch."""

from __future__ import annotations

import numpy as np
import pytest

from fedblocks.device_runtime.data import CROP_PAD, BatchAugmenter, augmentable, crop_flip
from fedblocks.device_runtime.spec import StageSpec, TensorSpec


def _stage(*inputs: tuple[str, tuple[int, ...], str]) -> StageSpec:
    return StageSpec(id="grow-1", kind="grow", inputs=tuple(TensorSpec(n, s, d) for n, s, d in inputs),
                     outputs=(TensorSpec("loss", (), "float32"),), trainable=(TensorSpec("w", (3,), "float32"),))


def test_crop_flip_is_a_crop_of_the_zero_padded_image_then_a_mirror() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 3, 12, 10)).astype(np.float32)
    out = crop_flip(x, np.random.default_rng(11))
    draws = np.random.default_rng(11)
    shifts, flips = draws.integers(-CROP_PAD, CROP_PAD + 1, size=(64, 2)), draws.random(64) < 0.5
    padded = np.pad(x, ((0, 0), (0, 0), (CROP_PAD, CROP_PAD), (CROP_PAD, CROP_PAD)))
    for i, (dy, dx) in enumerate(shifts):
        want = padded[i, :, CROP_PAD + dy:CROP_PAD + dy + 12, CROP_PAD + dx:CROP_PAD + dx + 10]
        np.testing.assert_array_equal(out[i], want[:, :, ::-1] if flips[i] else want, err_msg=f"image {i}")
    # 64 draws cover both signs, zero shifts, and both flip outcomes
    assert shifts.min() < 0 < shifts.max() and 0 < flips.sum() < 64
    assert out.dtype == x.dtype and out.shape == x.shape and out.flags.c_contiguous
    assert np.array_equal(x, np.random.default_rng(3).normal(size=(64, 3, 12, 10)).astype(np.float32))  # input kept


def test_augmenter_is_seeded_leaves_labels_and_batch_order_alone() -> None:
    x = np.arange(8 * 1 * 10 * 10, dtype=np.float32).reshape(8, 1, 10, 10)
    y = np.arange(8)
    first = [BatchAugmenter("crop-flip", 5)({"x": x, "y": y}) for _ in range(2)]
    np.testing.assert_array_equal(first[0]["x"], first[1]["x"])  # same seed, same batches
    assert first[0]["y"] is y
    other = BatchAugmenter("crop-flip", 6)({"x": x, "y": y})["x"]
    assert not np.array_equal(other, first[0]["x"])
    plain = {"x": x, "y": y}
    assert BatchAugmenter("none", 5)(plain) is plain
    # the augmentation draws from its own stream, not the batch order's default_rng(seed): the same
    # seed's permutation comes out of the two generators differently
    assert not np.array_equal(BatchAugmenter("crop-flip", 5).rng.permutation(64),
                              np.random.default_rng(5).permutation(64))
    with pytest.raises(ValueError, match="augmentation 'mixup' is unknown"):
        BatchAugmenter("mixup", 0)


def test_only_image_and_label_stages_are_augmentable() -> None:
    assert augmentable(_stage(("x", (4, 3, 32, 32), "float32"), ("y", (4,), "int64"))) is None
    teacher = _stage(("x", (4, 3, 32, 32), "float32"), ("y", (4,), "int64"), ("teacher", (4, 10), "float32"))
    assert "input 'teacher' is per-sample data computed from the unaugmented images" in augmentable(teacher)
    assert "no image input 'x'" in augmentable(_stage(("tokens", (4, 80), "int64"), ("y", (4,), "int64")))
    assert "not a float batch of images" in augmentable(_stage(("x", (4, 3), "float32"), ("y", (4,), "int64")))
    assert "not a float batch of images" in augmentable(_stage(("x", (4, 1, 8, 8), "float32")))
