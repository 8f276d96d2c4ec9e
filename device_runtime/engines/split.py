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
  Memory: `z.backward(g)` never uses the loss sum(z * g), so it is cut out of the
  unflattened graph (`_without_cut_loss`): no z-sized product in the forward, and no mul
  node keeping z saved. Once z is sent (`activation_sent`), its storage is freed unless a
  tensor saved for backward shares it (a ReLU at the cut saves its output, z itself; a
  conv saves only its input): then z and g are never held at the same time.
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
    conv: str | None = None  # torch fronts: the convolution kernels they run (split_config.TORCH_CONV_KERNELS)
    supports_recompute = False
    forward_passes = 1  # front forward passes per step (two-pass engines recompute it once by construction)

    def __init__(self, stage: StageSpec) -> None:
        self.stage = stage
        self.recompute: tuple[str, ...] = ()
        self.activations_freed = 0  # steps whose z storage was freed once sent, before g arrived

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

    def activation_sent(self) -> None:  # noqa: B027 - optional hook
        """z (the array forward returned) is on the wire and no longer used by the caller: the
        front may free it before g arrives. The caller must not touch that array again."""

    def set_recompute(self, units: tuple[str, ...]) -> None:
        if units:
            raise EngineError(f"engine '{self.engine}' cannot recompute units (see device_runtime/engines/split.py)")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class TorchSplitFront(SplitFront):
    engine = "torch"
    supports_recompute = True

    def __init__(self, stage: StageSpec, artifacts: dict[str, str], optimizer: OptimizerConfig,
                 module: object | None = None, conv: str = "onednn") -> None:
        """`module`: an eager module with the same contract instead of the .pt2 (the host's
        simulated testbed passes the stage program itself; it sets no process-wide flag).
        `conv`: the convolution kernels (split_config.TORCH_CONV_KERNELS); "native" turns oneDNN
        off in this process, which trains nothing but this front."""
        super().__init__(stage)
        import torch

        if module is None:
            torch.backends.mkldnn.enabled = conv == "onednn"
        self.conv = conv if module is None else "onednn"

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
        # an eager module (simulated testbed) keeps its loss: its memory is modelled there
        self._loss_removed = module is None and _without_cut_loss(self._module)
        self._z_releasable = False
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
        inputs = (self._torch.from_numpy(np.ascontiguousarray(x)), self._g_placeholder)
        if not self._loss_removed:  # the loss keeps z saved: nothing to find out
            self._outputs = self._module(*inputs)
            return self._outputs[-1].detach().numpy()
        saved: set[int] = set()

        def pack(t: object) -> object:  # records which storages backward will read
            saved.add(t.untyped_storage().data_ptr())  # type: ignore[attr-defined]
            return t

        with self._torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._outputs = self._module(*inputs)
        z = self._outputs[-1]
        self._z_releasable = z.untyped_storage().data_ptr() not in saved
        if self._z_releasable and z.dtype == self._torch.float32 and z.is_contiguous():
            # not z.numpy(): that pins the storage (torch refuses to resize it while numpy may look)
            return np.asarray(_TensorMemory(z))
        self._z_releasable = False
        return z.detach().numpy()

    def activation_sent(self) -> None:
        if self._z_releasable and self._outputs:
            # backward from g reads only the saved tensors; autograd checks z's shape, which stays
            self._outputs[-1].untyped_storage().resize_(0)
            self._z_releasable = False
            self.activations_freed += 1

    def backward_step(self, g: np.ndarray) -> None:
        z = self._outputs[-1]
        self._optimizer.zero_grad(set_to_none=True)
        z.backward(self._torch.from_numpy(np.ascontiguousarray(g)))
        self._optimizer.step()
        stats = self._stats.output_indices()
        self._stats.update([o.detach().numpy() if i in stats else None for i, o in enumerate(self._outputs)])
        self._outputs = ()  # frees the graph


class _TensorMemory:
    """A float32 numpy view of a contiguous tensor's memory through the array interface,
    without pinning its storage. The view holds the tensor but not its storage's lifetime:
    it is valid until TorchSplitFront.activation_sent frees that storage."""

    def __init__(self, tensor: object) -> None:
        self._tensor = tensor
        self.__array_interface__ = {"shape": tuple(tensor.shape), "typestr": "<f4",  # type: ignore[attr-defined]
                                    "data": (tensor.data_ptr(), True), "version": 3}  # type: ignore[attr-defined]


def _without_cut_loss(module: object) -> bool:
    """Cut the loss sum(z * g) out of an unflattened split program's root graph (module doc).

    The outputs keep their structure: the loss slot returns z as well. False (nothing
    changed) when the module is not an FX graph ending in (loss, ..., z)."""
    import torch.fx

    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph) or not callable(getattr(module, "finalize", None)):
        return False
    output = next((n for n in graph.nodes if n.op == "output"), None)
    outs = output.args[0] if output is not None and output.args else None
    if not isinstance(outs, tuple | list) or len(outs) < 2:
        return False
    output.args = ((outs[-1], *outs[1:]),)  # type: ignore[union-attr]
    graph.eliminate_dead_code()
    graph.lint()
    module.finalize()  # type: ignore[attr-defined]  # regenerates the code from the edited graph
    return True


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
                     optimizer: OptimizerConfig, torch_conv: str = "onednn") -> SplitFront:
    if engine not in FRONTS:
        raise EngineError(f"engine '{engine}' has no split front (known: {', '.join(FRONTS)})")
    try:
        if engine == "torch":
            return TorchSplitFront(stage, artifacts, optimizer, conv=torch_conv)
        return FRONTS[engine](stage, artifacts, optimizer)  # type: ignore[call-arg]
    except ImportError as exc:
        raise EngineError(f"engine '{engine}' is not installed on this device ({exc})") from None
