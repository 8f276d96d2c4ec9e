"""ONNX Runtime training adapter (onnxruntime-training 1.19.2).

Artifacts: ``training_model`` + ``checkpoint`` (required), ``eval_model``
(optional; loaded when given). Every trainable and frozen tensor lives in the
checkpoint and is read / written by global name through
``CheckpointState.parameters``. One step: ``Module(*inputs)`` runs forward +
backward (ORT accumulates gradients into the checkpoint's gradient buffers),
then the adapter applies torch.optim.SGD (momentum, weight decay) in numpy from
``parameters[name].grad`` -- ORT 1.19.2's SGD optimizer model has neither -- and
resets the gradients. The optimizer_model artifact is therefore not loaded.
BatchNorm running statistics are not in the training graph (train mode uses
batch statistics); the adapter keeps them and updates them from the outputs.

Session settings (docs/device_runtime.md has the measurements behind them):
- ``intra_op_num_threads`` = FEDBLOCKS_THREADS when set (ORT ignores OMP_NUM_THREADS),
  one inter-op thread (the training graph runs sequentially anyway);
- CPU memory: ORT's default arena grows in power-of-two extensions and never returns
  memory, which put ResNet-18's measured footprint 85 % above its need; with the arena
  off every step mmaps and page-faults its buffers again (~20 % slower). The adapter
  registers one process-wide arena that extends by exactly the requested size
  (``arena_extend_strategy`` = kSameAsRequested, ``session.use_env_allocators``): as fast
  as the default arena, and its footprint is what ORT's allocation plan needs
  (export/memory_ort.py predicts it at export);
- SGD is applied in place (NumpySGD.update_inplace) on numpy views of the checkpoint's
  parameter and gradient buffers (``Parameter.data`` / ``.grad`` share ORT's memory; the
  adapter checks that at load and falls back to copies if a build of ORT ever copies).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import numpy as np

from ..spec import OptimizerConfig, StageSpec
from .base import EngineError, TrainingEngine, threads_from_env
from .sgd import NumpySGD, RunningStats, sgd_workspace


def _import_onnxruntime_training_api() -> ModuleType:
    """``onnxruntime`` and ``onnxruntime.training.api`` without importing torch.

    Why: the training build's ``import onnxruntime`` checks for ORTModule and
    ``onnxruntime.training``'s ``__init__`` imports its optim / artifacts modules, and both
    import torch: ~2 s of CPU and ~300 MB more baseline per job (measured on this box:
    0.1 s and 43 MB max RSS without), and a phone has no torch. ``api`` needs only
    ``onnxruntime.capi``. In a process that already imported onnxruntime (the host, the
    tests) the normal import is used, so nobody else sees a partial package.
    """
    if "onnxruntime" in sys.modules:
        import onnxruntime.training.api as api

        return api
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise ImportError("No module named 'onnxruntime'")
    training_dir = os.path.join(os.path.dirname(spec.origin), "training")
    package_spec = importlib.util.spec_from_file_location(
        "onnxruntime.training", os.path.join(training_dir, "__init__.py"), submodule_search_locations=[training_dir])
    if package_spec is None:
        raise ImportError("onnxruntime has no training package (pip install onnxruntime-training-cpu==1.19.2)")
    package = importlib.util.module_from_spec(package_spec)  # not executed: its __init__ imports torch
    sys.modules["onnxruntime.training"] = package
    sys.modules["onnxruntime.training.ortmodule"] = None  # type: ignore[assignment]  # ImportError: "no ORTModule"
    try:
        import onnxruntime.training.api as api
    finally:
        del sys.modules["onnxruntime.training.ortmodule"]
        if sys.modules.get("onnxruntime.training") is package:
            del sys.modules["onnxruntime.training"]  # a later full import runs the real __init__
    return api


_api = _import_onnxruntime_training_api()
CheckpointState, Module = _api.CheckpointState, _api.Module
onnxruntime = sys.modules["onnxruntime"]  # imported by the call above

_ENV_ARENA: list[bool] = []  # registered once per process (ORT refuses a second registration)


def _register_exact_arena() -> bool:
    """A process-wide CPU arena that grows by exactly what is requested; False if ORT refused it."""
    if not _ENV_ARENA:
        try:
            config = onnxruntime.OrtArenaCfg({"arena_extend_strategy": 1})  # 1 = kSameAsRequested
            info = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                             onnxruntime.OrtMemType.DEFAULT)
            onnxruntime.create_and_register_allocator(info, config)
            _ENV_ARENA.append(True)
        except Exception:  # an older/newer ORT without environment allocators: keep the session's own
            _ENV_ARENA.append(False)
    return _ENV_ARENA[0]


def session_options(threads: int | None) -> onnxruntime.SessionOptions:
    """The adapter's SessionOptions (module doc): thread count and the exact-size arena."""
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if _register_exact_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


class OrtEngine(TrainingEngine):
    name = "ort"
    artifact_roles = ("training_model", "checkpoint")

    def __init__(self, stage: StageSpec, artifacts: dict[str, str], optimizer: OptimizerConfig) -> None:
        super().__init__(stage, artifacts, optimizer)
        onnxruntime.set_default_logger_severity(3)
        try:
            self._state = CheckpointState.load_checkpoint(artifacts["checkpoint"])
            self._module = Module(artifacts["training_model"], self._state, artifacts.get("eval_model"),
                                  session_options=session_options(threads_from_env()))
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph ...)
            raise EngineError(f"ort could not load the stage artifacts: {str(exc).splitlines()[0]}") from None
        self._module.train()
        self._params = self._state.parameters
        names = {name for name, _ in self._params}
        absent = [t.name for t in stage.trainable if t.name not in names]
        if absent:
            raise EngineError(f"ort checkpoint has no trainable tensor '{absent[0]}'")
        self._in_graph = names
        self._input_names = list(self._module.input_names())
        expected = [t.name for t in stage.inputs]
        if self._input_names != expected:
            raise EngineError(f"ort training model inputs {self._input_names} differ from the stage's {expected}")
        self._output_names = list(self._module.output_names())
        if self._output_names != [o.name for o in stage.outputs]:
            raise EngineError(f"ort training model outputs {self._output_names} differ from the stage's")
        self._sgd = NumpySGD(optimizer)
        self._stats = RunningStats(stage)
        self._trainable = [t.name for t in stage.trainable]
        self._settable = {t.name for t in stage.trainable} | {t.name for t in stage.frozen}
        self._scratch = sgd_workspace(stage)
        self._views = self._parameters_are_views()

    def _parameters_are_views(self) -> bool:
        """Whether Parameter.data is a view of ORT's buffer (then SGD can write in place)."""
        if not self._trainable:
            return False
        param = self._params[self._trainable[0]]
        first, second = param.data, param.data
        return bool(np.shares_memory(first, second)) and first.dtype == np.float32 and first.flags.writeable

    def set_weights(self, tensors: dict[str, np.ndarray]) -> None:
        state_names = self._stats.names()
        for name, value in tensors.items():
            if name in state_names:
                self._stats.values[name] = np.array(value, dtype=np.float32)
            elif name in self._settable:
                if name in self._in_graph:  # a frozen tensor the graph never reads is simply not there
                    self._params[name] = np.ascontiguousarray(value, dtype=np.float32)
            else:
                raise EngineError(f"ort: stage '{self.stage.id}' has no tensor '{name}'")

    def get_weights(self) -> dict[str, np.ndarray]:
        out = {name: np.array(self._params[name].data, dtype=np.float32) for name in self._trainable}
        out.update({name: value.copy() for name, value in self._stats.values.items()})
        return out

    def step(self, inputs: dict[str, np.ndarray]) -> float:
        missing = self._stats.missing()
        if missing:
            raise EngineError(f"ort: set_weights must give state tensor '{missing[0]}' before training")
        outputs = self._module(*[inputs[name] for name in self._input_names])
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        for name in self._trainable:
            param = self._params[name]
            if self._views:
                self._sgd.update_inplace(name, param.data, param.grad, self._scratch)
            else:
                self._params[name] = self._sgd.update(name, param.data, param.grad)
        self._module.lazy_reset_grad()
        self._stats.update(outputs)
        return float(np.asarray(outputs[0]))

    def close(self) -> None:
        self._module = None  # type: ignore[assignment]
        self._state = None  # type: ignore[assignment]
