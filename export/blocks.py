"""BlockedModel: a model cut into K blocks plus ProFL's basic layers and output modules.

Indexing (one rule for all three containers): the 0-based index i = k - 1 of block k.
- `blocks[i]`                 block k = i + 1 (nn.ModuleList; the stem is folded into block 1).
- `basic_layers[str(i)]`      the basic layer that stands in for block k = i + 1; keys "1".."K-1"
                              (block 1 has none). Maps block k-1's output shape to block k's.
- `output_modules[str(i)]`    the exit of the sub-model that ends at block k = i + 1; keys
                              "0".."K-2" (block K exits through the real `head`).
- `head`                      the real classifier (pool + flatten + Linear).
Use `basic_layer(k)` / `output_module(k)` to index by the 1-based block number.

The BlockedModel's parameter and buffer names are THE global tensor names used in
weights .npz files, manifests and aggregation (`blocks.1.0.conv1.weight`,
`basic_layers.2.weight`, `output_modules.0.layers.1.weight`, `head.fc.weight`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fedblocks.export.errors import ExportError
from fedblocks.export.output_modules import OutputModule
from fedblocks.export.rewrites import ExplicitBatchNorm

BasicLayerFactory = Callable[[tuple[int, ...], tuple[int, ...]], nn.Module]


def _clear_batch_stats(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, ExplicitBatchNorm):
            m.batch_stats = None


def propagate_shapes(modules: list[nn.Module], input_shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[int, ...]]:
    """Per-sample output shape after each module in turn (fake tensors: no compute, no memory)."""
    shapes: list[tuple[int, ...]] = []
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        x = torch.zeros((2, *input_shape), dtype=dtype)
        for module in modules:
            x = module(x)
            shapes.append(tuple(int(s) for s in x.shape[1:]))
    for module in modules:
        _clear_batch_stats(module)
    return shapes


class BlockedModel(nn.Module):
    """A classifier as K blocks + head, with ProFL basic layers and output modules (see module doc)."""

    def __init__(
        self,
        name: str,
        blocks: list[nn.Module],
        head: nn.Module,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        basic_layer: BasicLayerFactory,
        boundary_rule: str,
        input_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if len(blocks) < 2:
            raise ExportError(f"{name}: progressive training needs at least 2 blocks, got {len(blocks)}")
        self.model_name = name
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.input_dtype = input_dtype
        self.boundary_rule = boundary_rule
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        shapes = propagate_shapes(list(self.blocks), self.input_shape, getattr(torch, input_dtype))
        self._block_shapes = shapes
        k_total = len(blocks)
        self.basic_layers = nn.ModuleDict({str(i): basic_layer(shapes[i - 1], shapes[i]) for i in range(1, k_total)})
        self.output_modules = nn.ModuleDict(
            {
                str(i): OutputModule({str(j): self.basic_layers[str(j)] for j in range(i + 1, k_total)}, head)
                for i in range(k_total - 1)
            }
        )

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block(self, k: int) -> nn.Module:
        self._check_block(k, 1, self.num_blocks)
        return self.blocks[k - 1]

    def basic_layer(self, k: int) -> nn.Module:
        self._check_block(k, 2, self.num_blocks)
        return self.basic_layers[str(k - 1)]

    def output_module(self, k: int) -> OutputModule:
        self._check_block(k, 1, self.num_blocks - 1)
        return self.output_modules[str(k - 1)]  # type: ignore[return-value]

    def _check_block(self, k: int, lo: int, hi: int) -> None:
        if not isinstance(k, int) or not lo <= k <= hi:
            raise ExportError(f"{self.model_name}: block index {k!r} out of range {lo}..{hi}")

    def block_output_shape(self, k: int, input_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Per-sample output shape of block k (1-based) for `input_shape` (default: the model's)."""
        self._check_block(k, 1, self.num_blocks)
        if input_shape is None or tuple(input_shape) == self.input_shape:
            return self._block_shapes[k - 1]
        return propagate_shapes(list(self.blocks[:k]), tuple(input_shape), getattr(torch, self.input_dtype))[-1]

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def prefix_logits(self, x: Tensor, k: int) -> Tensor:
        """Logits of the sub-model blocks 1..k + output module k (the real head for k = K)."""
        self._check_block(k, 1, self.num_blocks)
        for block in self.blocks[:k]:
            x = block(x)
        return self.head(x) if k == self.num_blocks else self.output_module(k)(x)

    def shrunk_logits(self, x: Tensor, first_basic: int) -> Tensor:
        """Logits of blocks 1..first_basic-1 + basic layers first_basic..K + head.

        first_basic = K + 1 is the full model. ProFL's shrink stage j trains against the
        teacher `shrunk_logits(x, j + 1)` (see stages.py).
        """
        self._check_block(first_basic, 2, self.num_blocks + 1)
        for block in self.blocks[: first_basic - 1]:
            x = block(x)
        for k in range(first_basic, self.num_blocks + 1):
            x = self.basic_layer(k)(x)
        return self.head(x)

    def block_tensor_names(self, k: int) -> list[str]:
        """Global names of block k's parameters and buffers."""
        self._check_block(k, 1, self.num_blocks)
        prefix = f"blocks.{k - 1}."
        return [n for n, _ in self.named_parameters() if n.startswith(prefix)] + [
            n for n, _ in self.named_buffers() if n.startswith(prefix)
        ]

    def output_module_sources(self) -> dict[str, str]:
        """For every output-module tensor, the global tensor it is initialised from after shrinking.

        `output_modules.{i}.layers.{j}.*` <- `basic_layers.{j}.*`, `output_modules.{i}.head.*` <- `head.*`.
        """
        sources: dict[str, str] = {}
        for name, _ in [*self.named_parameters(), *self.named_buffers()]:
            if not name.startswith("output_modules."):
                continue
            rest = name.split(".", 2)[2]  # drop "output_modules.{i}."
            if rest.startswith("layers."):
                sources[name] = "basic_layers." + rest[len("layers."):]
            else:
                sources[name] = rest  # "head.*"
        return sources

    def param_count(self, include_aux: bool = False) -> int:
        """Parameters of the deployed model (blocks + head); with basic layers and output modules if asked."""
        return sum(
            p.numel()
            for n, p in self.named_parameters()
            if include_aux or n.startswith(("blocks.", "head."))
        )
