"""Input-shape checks shared by the zoo builders."""

from __future__ import annotations

from fedblocks.export.errors import ExportError


def check_image_shape(model: str, input_shape: tuple[int, ...], min_side: int, multiple: int = 1) -> tuple[int, int, int]:
    """(C, H, W) with positive C and H, W >= min_side and divisible by `multiple`, else ExportError."""
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ExportError(f"{model}: input shape must be C,H,W with positive integers, got {list(shape)}")
    c, h, w = shape
    if h < min_side or w < min_side or h % multiple or w % multiple:
        extra = f" and divisible by {multiple}" if multiple > 1 else ""
        raise ExportError(f"{model}: input H and W must be >= {min_side}{extra}, got {h}x{w}")
    return c, h, w


def check_num_blocks(model: str, num_blocks: int | None, natural: int, allowed: tuple[int, ...] | None = None) -> int:
    """The block count to use: `natural` unless overridden by one of `allowed` (default: only natural)."""
    if num_blocks is None:
        return natural
    allowed = allowed or (natural,)
    if num_blocks not in allowed:
        raise ExportError(f"{model}: num_blocks={num_blocks} not supported; choose one of {', '.join(map(str, allowed))}")
    return num_blocks
