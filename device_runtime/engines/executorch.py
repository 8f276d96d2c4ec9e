"""ExecuTorch training adapter (executorch 1.5.1, Python bindings of the C++ TrainingModule).

The .pte's method ``forward(*stage_inputs, *frozen)`` returns the stage outputs
and (internally) the gradients of the trainable parameters; frozen tensors are
program inputs (export/builders/executorch.py): their export-time values come from
the ``frozen`` artifact (.npz), set_weights may replace any of them by name, and
they are passed on every step. ``named_parameters()`` returns the program's live weight
tensors, but only after one ``forward_backward`` has run; setting trainable
weights before the first step therefore runs one warm-up forward_backward on
zero inputs (its gradients are discarded). SGD with torch semantics is applied
in numpy (sgd.py) in place on the live tensors.
"""

from __future__ import annotations

import logging
import zipfile

# executorch's import warns about torchao's optional CUDA kernels and a torch pytree deprecation.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from executorch.extension.training import _load_for_executorch_for_training  # noqa: E402

from ..spec import OptimizerConfig, StageSpec  # noqa: E402
from .base import EngineError, TrainingEngine, pin_mmap_threshold, threads_from_env  # noqa: E402
from .sgd import NumpySGD, RunningStats, sgd_workspace  # noqa: E402


def _apply_thread_count() -> None:
    """FEDBLOCKS_THREADS -> ExecuTorch's threadpool (XNNPACK's delegated ops run on it; it
    ignores OMP_NUM_THREADS and starts with one thread per core)."""
    threads = threads_from_env()
    if threads is None:
        return
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        return
    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


class ExecuTorchEngine(TrainingEngine):
    name = "executorch"
    artifact_roles = ("program", "frozen")

    def __init__(self, stage: StageSpec, artifacts: dict[str, str], optimizer: OptimizerConfig) -> None:
        super().__init__(stage, artifacts, optimizer)
        _apply_thread_count()
        pin_mmap_threshold()  # the per-step gradient outputs would ratchet glibc's heap up
        try:
            self._module = _load_for_executorch_for_training(artifacts["program"])
        except Exception as exc:
            raise EngineError(f"executorch could not load the program: {str(exc).splitlines()[0]}") from None
        self._trainable = [t.name for t in stage.trainable]
        self._frozen: dict[str, torch.Tensor | None] = {t.name: None for t in stage.frozen}
        self._load_frozen_defaults(artifacts["frozen"])
        self._sgd = NumpySGD(optimizer)
        self._stats = RunningStats(stage)
        self._scratch = sgd_workspace(stage)

    def _load_frozen_defaults(self, path: str) -> None:
        """The export-time frozen values (the builder's frozen.npz); set_weights may replace them."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                values = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise EngineError(f"executorch: frozen tensors file is not a valid .npz: {exc}") from None
        for spec in self.stage.frozen:
            value = values.get(spec.name)
            if value is None or tuple(value.shape) != spec.shape or value.dtype.name != spec.dtype:
                raise EngineError(f"executorch: frozen tensors file lacks '{spec.name}' {list(spec.shape)} {spec.dtype}")
            self._frozen[spec.name] = torch.from_numpy(value)

    def _run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        missing = [n for n, v in self._frozen.items() if v is None]
        if missing:
            raise EngineError(f"executorch: set_weights must give frozen tensor '{missing[0]}' before training")
        return self._module.forward_backward("forward", (*inputs, *self._frozen.values()))

    def _live_parameters(self) -> dict[str, torch.Tensor]:
        if self._module.named_params is None:
            # Warm-up on zeros, through the same calls as step(): it materialises named_parameters(),
            # and the torch code a step runs (numpy <-> tensor views) is paged in before the baseline.
            zeros = [np.zeros(t.shape, dtype=t.dtype) for t in self.stage.inputs]
            outputs = self._run([torch.from_numpy(z) for z in zeros])
            for tensor in (*self._module.named_parameters().values(), *self._module.named_gradients().values(),
                           *outputs):
                tensor.numpy()
            float(outputs[0])
        params = self._module.named_parameters()
        absent = [n for n in self._trainable if n not in params]
        if absent:
            raise EngineError(f"executorch program has no trainable tensor '{absent[0]}'")
        return params

    def set_weights(self, tensors: dict[str, np.ndarray]) -> None:
        state_names = self._stats.names()
        trainable: dict[str, np.ndarray] = {}
        for name, value in tensors.items():
            if name in state_names:
                self._stats.values[name] = np.array(value, dtype=np.float32)
            elif name in self._frozen:
                self._frozen[name] = torch.from_numpy(np.array(value))
            elif name in self._trainable:
                trainable[name] = value
            else:
                raise EngineError(f"executorch: stage '{self.stage.id}' has no tensor '{name}'")
        if trainable:
            params = self._live_parameters()
            for name, value in trainable.items():
                params[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))

    def get_weights(self) -> dict[str, np.ndarray]:
        params = self._live_parameters()
        out = {n: params[n].numpy().astype(np.float32, copy=True) for n in self._trainable}
        out.update({name: value.copy() for name, value in self._stats.values.items()})
        return out

    def step(self, inputs: dict[str, np.ndarray]) -> float:
        missing = self._stats.missing()
        if missing:
            raise EngineError(f"executorch: set_weights must give state tensor '{missing[0]}' before training")
        outputs = self._run([torch.from_numpy(np.asarray(inputs[t.name])) for t in self.stage.inputs])
        params = self._module.named_parameters()
        grads = self._module.named_gradients()
        for name in self._trainable:
            # numpy views of the program's live weight and gradient tensors: SGD in place (sgd.py)
            self._sgd.update_inplace(name, params[name].numpy(), grads[name].numpy(), self._scratch)
        self._stats.update([o.numpy() for o in outputs])
        return float(outputs[0])
