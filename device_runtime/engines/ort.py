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
"""

from __future__ import annotations

import numpy as np
import onnxruntime
from onnxruntime.training.api import CheckpointState, Module

from ..spec import OptimizerConfig, StageSpec
from .base import EngineError, TrainingEngine
from .sgd import NumpySGD, RunningStats


class OrtEngine(TrainingEngine):
    name = "ort"
    artifact_roles = ("training_model", "checkpoint")

    def __init__(self, stage: StageSpec, artifacts: dict[str, str], optimizer: OptimizerConfig) -> None:
        super().__init__(stage, artifacts, optimizer)
        onnxruntime.set_default_logger_severity(3)
        try:
            self._state = CheckpointState.load_checkpoint(artifacts["checkpoint"])
            self._module = Module(artifacts["training_model"], self._state, artifacts.get("eval_model"))
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
            self._params[name] = self._sgd.update(name, param.data, param.grad)
        self._module.lazy_reset_grad()
        self._stats.update(outputs)
        return float(np.asarray(outputs[0]))

    def close(self) -> None:
        self._module = None  # type: ignore[assignment]
        self._state = None  # type: ignore[assignment]
