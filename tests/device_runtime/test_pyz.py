"""fedblocks-runtime.pyz: self-contained, deterministic, runs from any cwd on a Python without fedblocks."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedblocks.device_runtime import build_runtime_pyz

from .conftest import ref, tiny_job

RUNTIME_DIR = Path(__file__).resolve().parents[2] / "device_runtime"
ENGINE_MODULES = {"onnxruntime", "executorch", "torch"}


def device_python(tmp: Path) -> Path:
    """A venv that sees numpy and the engines (this venv's site-packages) but NOT fedblocks.

    The site-packages path goes in through a plain .pth line, which adds the directory
    without running that directory's own .pth files -- so the editable fedblocks finder
    is not installed and `import fedblocks` fails, as on a phone.
    """
    env_dir = tmp / "devpy"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(env_dir)], check=True, capture_output=True)
    site = env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "engines.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir / "bin" / "python"


def numpy_only_python(tmp: Path) -> Path:
    """A venv with numpy and nothing else: a phone where no engine is installed."""
    env_dir = tmp / "numpy-only"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(env_dir)], check=True, capture_output=True)
    site = env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    purelib = Path(sysconfig.get_paths()["purelib"])
    for name in ("numpy", "numpy.libs"):
        if (purelib / name).exists():
            (site / name).symlink_to(purelib / name)
    return env_dir / "bin" / "python"


@pytest.fixture(scope="module")
def pyz_and_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pyz")
    return build_runtime_pyz(tmp / "fedblocks-runtime.pyz"), device_python(tmp)


def test_pyz_is_deterministic_and_holds_only_the_runtime(tmp_path: Path) -> None:
    a = build_runtime_pyz(tmp_path / "a.pyz")
    b = build_runtime_pyz(tmp_path / "b.pyz")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    names = zipfile.ZipFile(a).namelist()
    assert "__main__.py" in names and "fedblocks/device_runtime/runner.py" in names
    assert all(n in ("__main__.py", "fedblocks/__init__.py") or n.startswith("fedblocks/device_runtime/")
               for n in names)
    assert not any("__pycache__" in n for n in names)


def test_build_pyz_command(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "fedblocks-runtime.pyz"
    proc = subprocess.run([sys.executable, "-m", "fedblocks.device_runtime", "build-pyz", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and Path(proc.stdout.strip()) == out and zipfile.is_zipfile(out)


def test_device_python_cannot_see_fedblocks(pyz_and_python: tuple[Path, Path]) -> None:
    pyz, python = pyz_and_python
    probe = ("import importlib.util as u, sys; sys.path.insert(0, sys.argv[1]); "
             "print(u.find_spec('numpy') is not None, u.find_spec('fedblocks.device_runtime') is not None, "
             "*[u.find_spec(m) is not None for m in ('fedblocks.export', 'fedblocks.testbed', 'fedblocks.host')])")
    out = subprocess.run([str(python), "-c", probe, str(pyz)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True", "False", "False", "False"], out.stderr
    bare = subprocess.run([str(python), "-c", "import fedblocks"], capture_output=True, text=True, timeout=60)
    assert bare.returncode != 0


def test_pyz_runs_a_job_from_another_cwd(pyz_and_python: tuple[Path, Path], tmp_path: Path) -> None:
    """Through the pyz the supervisor re-launches the pyz as its training child."""
    pyz, python = pyz_and_python
    files = tiny_job(tmp_path)
    np.savez(tmp_path / "shard.npz", x=np.zeros((2, 3), np.float32), y=np.zeros(2, np.int64))
    files.job["data"] = ref(tmp_path / "shard.npz")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([str(python), str(pyz), "run", str(files.write())], cwd=elsewhere,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["status"] == "failed"
    # The reason comes from the training child (shard validation runs there), so the child ran from the pyz.
    assert "shard has 2 samples, fewer than one batch of 4" in files.status()["reason"]
    log = (files.bundle / "runtime.log").read_text()
    assert "Traceback" not in log


def _imports(path: Path) -> set[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((0, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add((node.level, node.module or ""))
    return found


def test_runtime_imports_only_stdlib_numpy_and_engines() -> None:
    """AST scan of every module of device_runtime/ (the pyz holds exactly these)."""
    allowed_third_party = {"numpy"}
    bad: list[str] = []
    for path in sorted(RUNTIME_DIR.rglob("*.py")):
        in_engines = path.parent.name == "engines"
        for level, module in _imports(path):
            top = module.split(".")[0]
            if level > 0:
                continue  # relative: inside the runtime package
            if module == "fedblocks.device_runtime" or module.startswith("fedblocks.device_runtime."):
                continue
            if top in sys.stdlib_module_names or top == "__future__" or top in allowed_third_party:
                continue
            if in_engines and top in ENGINE_MODULES:
                continue
            bad.append(f"{path.relative_to(RUNTIME_DIR.parent)} imports {module}")
    assert not bad, "device_runtime must import only stdlib, numpy and its engine:\n" + "\n".join(bad)


def test_engine_not_installed_is_a_failed_bundle(pyz_and_python: tuple[Path, Path], tmp_path: Path) -> None:
    pyz, _ = pyz_and_python
    python = numpy_only_python(tmp_path)
    files = tiny_job(tmp_path)  # a valid job for engine "torch"; this device has no torch
    proc = subprocess.run([str(python), str(pyz), "run", str(files.write())], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert files.status()["reason"] == "engine 'torch' is not installed (pip install torch==2.13.0)"


@pytest.mark.slow
def test_pyz_trains_a_real_stage_on_a_device_python(pyz_and_python: tuple[Path, Path], tmp_path: Path) -> None:
    """ResNet-8 grow-2 with the torch engine through the pyz, on a Python where fedblocks is not importable."""
    pytest.importorskip("fedblocks.device_runtime.engines.torch")
    from .engine_fixtures import export_resnet8, write_job

    pyz, python = pyz_and_python
    exported = export_resnet8(("torch",), ("grow-2",))
    rng = np.random.default_rng(0)
    shard = {"x": rng.standard_normal((64, 3, 32, 32)).astype(np.float32),
             "y": rng.integers(0, 10, 64).astype(np.int64)}
    job = write_job(tmp_path / "work", exported, "grow-2", "torch", shard, epochs=None, max_steps=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([str(python), str(pyz), "run", str(job)], cwd=elsewhere, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    bundle = job.parent / "result"
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["engine"] == "torch" and (bundle / "weights.npz").is_file()


def test_ort_engine_loads_without_torch() -> None:
    """A phone has no torch: the ORT adapter's import must not pull it in (onnxruntime-training's
    package __init__ and its ORTModule check would), and a later full import still works."""
    pytest.importorskip("onnxruntime.training")
    code = ("import sys\n"
            "from fedblocks.device_runtime.engines import ort\n"
            "assert ort.Module.__name__ == 'Module' and ort.onnxruntime.SessionOptions\n"
            "assert 'torch' not in sys.modules, 'the ORT adapter imported torch'\n"
            "from onnxruntime.training import artifacts\n"  # the host's export path, in the same process
            "assert hasattr(artifacts, 'generate_artifacts')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
