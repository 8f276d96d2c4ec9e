"""Artifact builders: one module per engine, all fed by the same stage program.

Each builder module exposes ``ENGINE``, ``ROLES`` (role -> file extension),
``check_available()`` (ExportError naming the pip package when the engine is not
importable) and ``build(stage, example_inputs, workdir) -> dict[role, Path]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from types import ModuleType

from fedblocks.export.errors import ExportError

ENGINES: tuple[str, ...] = ("ort", "executorch", "torch")
INSTALL_HINTS: dict[str, str] = {
    "ort": "pip install onnxruntime-training-cpu==1.19.2 onnx==1.17.0",
    "executorch": "pip install executorch==1.5.1",
    "torch": "pip install torch==2.13.0",
}


def builder(engine: str) -> ModuleType:
    """The builder module for ``engine`` (ExportError for an unknown engine name)."""
    if engine not in ENGINES:
        raise ExportError(f"unknown engine '{engine}': choose from {', '.join(ENGINES)}")
    return importlib.import_module(f"fedblocks.export.builders.{engine}")


# Top-level packages an engine needs; checked without importing them (importing executorch
# alone takes seconds, and a warm re-export never needs an engine).
ENGINE_PACKAGES: dict[str, tuple[str, ...]] = {
    "ort": ("onnx", "onnxruntime"),
    "executorch": ("executorch",),
    "torch": ("torch",),
}


def check_installed(engine: str) -> None:
    """ExportError 'engine ... is not installed' when a package of ``engine`` cannot be found."""
    for package in ENGINE_PACKAGES[engine]:
        if package in sys.modules:
            found = sys.modules[package] is not None  # None: an import that is known to fail
        else:
            found = importlib.util.find_spec(package) is not None
        if not found:
            raise ExportError(f"engine '{engine}' is not installed ({INSTALL_HINTS[engine]})")


def require_modules(engine: str, *modules: str) -> None:
    """Import ``modules``; an ImportError becomes the one-line 'not installed' ExportError."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ExportError(
                f"engine '{engine}' is not installed ({INSTALL_HINTS[engine]}; import of {name} failed: {exc})"
            ) from None


_OP_PATTERNS = (
    # ORT's gradient builder: "The gradient builder has not been registered: ReduceMax for node /x/ReduceMax"
    re.compile(r"has not been registered: ([A-Za-z0-9_]+ for node \S+)"),
    re.compile(r"\b(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)"),
    re.compile(r"\b(torch\.ops\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)"),
    re.compile(r"[Oo]perator\s+'?([A-Za-z0-9_:.]+)'?"),
)


def failing_operator(exc: BaseException) -> str | None:
    """Best guess at the operator an engine choked on, from its exception text."""
    text = f"{type(exc).__name__}: {exc}"
    for pattern in _OP_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).removeprefix("torch.ops.").replace("::", ".")
    return None


def first_line(exc: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def stage_label(stage: object) -> str:
    return f"{getattr(stage, 'model_name', type(stage).__name__)} stage {getattr(stage, 'stage_id', '?')}"
