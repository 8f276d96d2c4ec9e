"""torch adapter: the stage's ExportedProgram (.pt2) trained with autograd.

``torch.export.load(program).module()`` is a GraphModule whose parameters keep the
global names and requires_grad flags of the stage; every tensor is settable by
name. The step is the reference: loss.backward() + torch.optim.SGD. Running
statistics are updated from the batch-statistic outputs like every engine.
"""

from __future__ import annotations

import numpy as np
import torch

from ..spec import OptimizerConfig, StageSpec
from .base import EngineError, TrainingEngine
from .sgd import RunningStats


class TorchEngine(TrainingEngine):
    name = "torch"
    artifact_roles = ("program",)

    def __init__(self, stage: StageSpec, artifacts: dict[str, str], optimizer: OptimizerConfig) -> None:
        super().__init__(stage, artifacts, optimizer)
        try:
            self._module = torch.export.load(artifacts["program"]).module()
        except Exception as exc:  # corrupt / foreign file: torch raises many types
            raise EngineError(f"torch could not load the program: {str(exc).splitlines()[0]}") from None
        self._tensors = {**dict(self._module.named_parameters()), **dict(self._module.named_buffers())}
        self._trainable = [t.name for t in stage.trainable]
        absent = [n for n in self._trainable if n not in self._tensors]
        if absent:
            raise EngineError(f"torch program has no trainable tensor '{absent[0]}'")
        params = [self._tensors[n] for n in self._trainable]
        if not all(p.requires_grad for p in params):
            raise EngineError("torch program: a trainable tensor does not require grad")
        self._optimizer = torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.momentum,
                                          weight_decay=optimizer.weight_decay)
        self._stats = RunningStats(stage)
        self._settable = {t.name for t in stage.trainable} | {t.name for t in stage.frozen}

    def set_weights(self, tensors: dict[str, np.ndarray]) -> None:
        state_names = self._stats.names()
        with torch.no_grad():
            for name, value in tensors.items():
                if name in state_names:
                    self._stats.values[name] = np.array(value, dtype=np.float32)
                elif name in self._settable:
                    if name in self._tensors:
                        target = self._tensors[name]
                        target.copy_(torch.from_numpy(np.asarray(value)).to(target.dtype))
                else:
                    raise EngineError(f"torch: stage '{self.stage.id}' has no tensor '{name}'")

    def get_weights(self) -> dict[str, np.ndarray]:
        out = {n: self._tensors[n].detach().numpy().astype(np.float32, copy=True) for n in self._trainable}
        out.update({name: value.copy() for name, value in self._stats.values.items()})
        return out

    def step(self, inputs: dict[str, np.ndarray]) -> float:
        missing = self._stats.missing()
        if missing:
            raise EngineError(f"torch: set_weights must give state tensor '{missing[0]}' before training")
        outputs = self._module(*[torch.from_numpy(np.asarray(inputs[t.name])) for t in self.stage.inputs])
        self._optimizer.zero_grad(set_to_none=True)
        outputs[0].backward()
        self._optimizer.step()
        self._stats.update([o.detach().numpy() for o in outputs])
        return float(outputs[0].detach())
