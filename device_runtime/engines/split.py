"""The phone's half of a SmartSplit step, per engine: forward to the cut, then backward from g.

A split_front stage program is `forward(x, g) -> (sum(z * g), *batch_stats, z)`. What
each engine can do with it:

- torch (`TorchSplitFront`): ONE forward. The .pt2 is unflattened
  (torch.export.unflatten), so its units (`blocks.0.stem`, `blocks.1.0` ...) are
  callable submodules; z comes back still attached to the autograd graph, the runtime
  sends it, and on the server's g runs `z.backward(g)` + torch.optim.SGD. Recompute is
  real: a unit switched on runs under torch.utils.checkpoint (non-reentrant), so it
  keeps only its input and re-runs its forward in backward. The placeholder g of the
  forward is a zero-stride view (4 bytes), never materialised.
- ort (`OrtSplitFront`): TWO passes. ORT's on-device Module fuses forward and backward
  in one call of the exported training graph, so z comes from the eval model (same
  graph, explicit batch-statistics BatchNorm: the same z), and when g arrives the
  training graph runs forward + backward with it, then SGD (the ORT adapter's own step).
  The front's forward therefore runs twice; no per-unit recompute (ORT's memory
  optimizer only works inside ORTModule, not on on-device artifacts).
- executorch (`ExecuTorchSplitFront`): TWO passes, and the first is a full
  forward_backward whose gradients are discarded (ExecuTorch's training module has no
  forward-only method for a joint program); no per-unit recompute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..spec import OptimizerConfig, StageSpec
from .base import EngineError


class SplitFront(ABC):
    engine = ""
    supports_recompute = False
    forward_passes = 1  # front forward passes per step (two-pass engines recompute it once by construction)

    def __init__(self, stage: StageSpec) -> None:
        self.stage = stage
        self.recompute: tuple[str, ...] = ()

    @abstractmethod
    def set_weights(self, tensors: dict[str, np.ndarray]) -> None: ...

    @abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Forward to the cut; returns z (float32, the stage's z shape)."""

    @abstractmethod
    def backward_step(self, g: np.ndarray) -> None:
        """Backward from dL/dz = g, SGD step, running-statistic update (after forward)."""

    def set_recompute(self, units: tuple[str, ...]) -> None:
        if units:
            raise EngineError(f"engine '{self.engine}' cannot recompute units (see device_runtime/engines/split.py)")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class TorchSplitFront(SplitFront):
    engine = "torch"
    supports_recompute = True

    def __init__(self, stage: StageSpec, artifacts: dict[str, str], optimizer: OptimizerConfig,
                 module: object | None = None) -> None:
        """`module`: an eager module with the same contract instead of the .pt2 (the host's
        simulated testbed passes the stage program itself)."""
        super().__init__(stage)
        import torch

        from .sgd import RunningStats

        self._torch = torch
        if module is not None:
            self._module = module
        else:
            try:
                program = torch.export.load(artifacts["program"])
                self._module = torch.export.unflatten(program)
            except Exception as exc:  # corrupt / foreign file: torch raises many types
                raise EngineError(f"torch could not load the split program: {str(exc).splitlines()[0]}") from None
        self._tensors = {**dict(self._module.named_parameters()), **dict(self._module.named_buffers())}
        self._trainable = [t.name for t in stage.trainable]
        absent = [n for n in self._trainable if n not in self._tensors]
        if absent:
            raise EngineError(f"torch split program has no trainable tensor '{absent[0]}'")
        params = [self._tensors[n] for n in self._trainable]
        for p in params:
            p.requires_grad_(True)
        self._optimizer = torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.momentum,
                                          weight_decay=optimizer.weight_decay)
        self._stats = RunningStats(stage)
        self._forwards: dict[str, object] = {}  # unit -> its own forward, while checkpointed
        self._outputs: tuple = ()
        g = stage.inputs[1]
        self._g_placeholder = torch.zeros((), dtype=torch.float32).expand(*g.shape)

    def set_weights(self, tensors: dict[str, np.ndarray]) -> None:
        torch = self._torch
        state = self._stats.names()
        with torch.no_grad():
            for name, value in tensors.items():
                if name in state:
                    self._stats.values[name] = np.array(value, dtype=np.float32)
                elif name in self._tensors:
                    self._tensors[name].copy_(torch.from_numpy(np.asarray(value)))
                else:
                    raise EngineError(f"torch: stage '{self.stage.id}' has no tensor '{name}'")

    def get_weights(self) -> dict[str, np.ndarray]:
        out = {n: self._tensors[n].detach().numpy().astype(np.float32, copy=True) for n in self._trainable}
        out.update({name: value.copy() for name, value in self._stats.values.items()})
        return out

    def set_recompute(self, units: tuple[str, ...]) -> None:
        from torch.utils.checkpoint import checkpoint

        for name in list(self._forwards):
            if name not in units:  # switched off: restore the unit's own forward
                self._module.get_submodule(name).forward = self._forwards.pop(name)
        for name in units:
            if name in self._forwards:
                continue
            try:
                unit = self._module.get_submodule(name)
            except AttributeError:
                raise EngineError(f"torch split program has no unit '{name}'") from None
            own = unit.forward
            self._forwards[name] = own
            unit.forward = (lambda f: (lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k)))(own)
        self.recompute = tuple(units)

    def forward(self, x: np.ndarray) -> np.ndarray:
        missing = self._stats.missing()
        if missing:
            raise EngineError(f"torch: set_weights must give state tensor '{missing[0]}' before training")
        self._outputs = self._module(self._torch.from_numpy(np.ascontiguousarray(x)), self._g_placeholder)
        return self._outputs[-1].detach().numpy()

    def backward_step(self, g: np.ndarray) -> None:
        z = self._outputs[-1]
        self._optimizer.zero_grad(set_to_none=True)
        z.backward(self._torch.from_numpy(np.ascontiguousarray(g)))
        self._optimizer.step()
        self._stats.update([o.detach().numpy() for o in self._outputs])
        self._outputs = ()  # frees the graph


class _TwoPassFront(SplitFront):
    """Shared by the engines whose training call fuses forward and backward."""

    forward_passes = 2

    def __init__(self, stage: StageSpec, engine: object) -> None:
        super().__init__(stage)
        self._engine = engine
        self._x: np.ndarray | None = None
        g = stage.inputs[1]
        self._zeros = np.zeros(g.shape, dtype=np.float32)

    def set_weights(self, tensors: dict[str, np.ndarray]) -> None:
        self._engine.set_weights(tensors)  # type: ignore[attr-defined]

    def get_weights(self) -> dict[str, np.ndarray]:
        return self._engine.get_weights()  # type: ignore[attr-defined, no-any-return]

    def backward_step(self, g: np.ndarray) -> None:
        if self._x is None:
            raise EngineError("backward_step before forward")
        names = [t.name for t in self.stage.inputs]
        self._engine.step({names[0]: self._x, names[1]: np.ascontiguousarray(g, dtype=np.float32)})  # type: ignore[attr-defined]
        self._x = None

    def close(self) -> None:
        self._engine.close()  # type: ignore[attr-defined]


class OrtSplitFront(_TwoPassFront):
    engine = "ort"

    def __init__(self, stage: StageSpec, artifacts: dict[str, str], optimizer: OptimizerConfig) -> None:
        from .ort import OrtEngine

        if "eval_model" not in artifacts:
            raise EngineError("ort split front needs the 'eval_model' artifact (the forward to the cut)")
        super().__init__(stage, OrtEngine(stage, artifacts, optimizer))

    def forward(self, x: np.ndarray) -> np.ndarray:
        module = self._engine._module  # type: ignore[attr-defined]  # the adapter's onnxruntime Module
        self._x = np.ascontiguousarray(x)
        module.eval()
        try:
            outputs = module(self._x, self._zeros)
        finally:
            module.train()
        return np.asarray(outputs[-1], dtype=np.float32)


class ExecuTorchSplitFront(_TwoPassFront):
    engine = "executorch"

    def __init__(self, stage: StageSpec, artifacts: dict[str, str], optimizer: OptimizerConfig) -> None:
        from .executorch import ExecuTorchEngine

        super().__init__(stage, ExecuTorchEngine(stage, artifacts, optimizer))

    def forward(self, x: np.ndarray) -> np.ndarray:
        import torch

        self._x = np.ascontiguousarray(x)
        outputs = self._engine._run([torch.from_numpy(self._x), torch.from_numpy(self._zeros)])  # type: ignore[attr-defined]
        return np.array(outputs[len(self.stage.outputs) - 1].numpy(), dtype=np.float32)


FRONTS: dict[str, type[SplitFront]] = {"torch": TorchSplitFront, "ort": OrtSplitFront,
                                       "executorch": ExecuTorchSplitFront}


def load_split_front(engine: str, stage: StageSpec, artifacts: dict[str, str],
                     optimizer: OptimizerConfig) -> SplitFront:
    if engine not in FRONTS:
        raise EngineError(f"engine '{engine}' has no split front (known: {', '.join(FRONTS)})")
    try:
        return FRONTS[engine](stage, artifacts, optimizer)  # type: ignore[call-arg]
    except ImportError as exc:
        raise EngineError(f"engine '{engine}' is not installed on this device ({exc})") from None
