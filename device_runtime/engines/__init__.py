"""Engine adapters (ORT, ExecuTorch, torch) behind one TrainingEngine interface.

``load_engine(name, stage, artifacts, optimizer)`` imports the adapter (and with it
the engine) only when asked, so a device needs just the one engine it runs.
"""

from __future__ import annotations

import importlib

from ..spec import OptimizerConfig, StageSpec
from .base import EngineError, TrainingEngine

# engine -> (adapter module, class, packages whose absence means "not installed", install hint)
ENGINES: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "ort": ("ort", "OrtEngine", ("onnxruntime",), "pip install onnxruntime-training-cpu==1.19.2"),
    "executorch": ("executorch", "ExecuTorchEngine", ("executorch", "torch"), "pip install executorch==1.5.1"),
    "torch": ("torch", "TorchEngine", ("torch",), "pip install torch==2.13.0"),
}

__all__ = ["ENGINES", "EngineError", "TrainingEngine", "load_engine"]


def load_engine(name: str, stage: StageSpec, artifacts: dict[str, str], optimizer: OptimizerConfig) -> TrainingEngine:
    """The adapter for ``name`` with the stage's artifacts (role -> file path) loaded."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine '{name}' (known: {', '.join(ENGINES)})")
    module_name, class_name, packages, hint = ENGINES[name]
    try:
        module = importlib.import_module(f".{module_name}", __package__)
    except ImportError as exc:
        missing = exc.name or ""
        if missing.split(".")[0] in packages or not missing:
            raise EngineError(f"engine '{name}' is not installed ({hint})") from None
        raise
    engine_cls: type[TrainingEngine] = getattr(module, class_name)
    absent = [role for role in engine_cls.artifact_roles if role not in artifacts]
    if absent:
        raise EngineError(f"engine '{name}': no '{absent[0]}' artifact given (needs {', '.join(engine_cls.artifact_roles)})")
    return engine_cls(stage, artifacts, optimizer)
