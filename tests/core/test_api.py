import subprocess
import sys

import pytest

import ressl


def test_every_public_name_resolves():
    assert len(ressl.__all__) == len(set(ressl.__all__))
    assert set(ressl.__all__) == {"__version__", *ressl._HOME}  # each lazy name is public
    for name in ressl.__all__:
        assert getattr(ressl, name) is not None, name


def test_core_import_stays_free_of_cli_and_onnx():
    code = "import ressl, sys; print(sorted(m for m in ('onnx', 'onnxruntime', 'typer', 'rich') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


def _modules_after(code: str) -> set[str]:
    """Top-level modules loaded by ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_light_import_loads_no_torch_until_a_torch_name_is_used():
    assert "torch" not in _modules_after("import ressl, ressl.export")
    assert "torch" not in _modules_after("from ressl.export import Embedder")
    assert "torch" in _modules_after("import ressl; ressl.relation_loss")


def test_cli_help_loads_no_torch():
    for args in (["--help"], ["train", "--help"], ["eval", "knn", "--help"], ["export", "--help"]):
        code = (
            f"from ressl.cli.app import main\ntry:\n    main({args!r})\nexcept SystemExit as e:\n"
        )
        code += "    assert not e.code"
        assert "torch" not in _modules_after(code), args


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'frobnicate'"):
        _ = ressl.frobnicate
    assert "train" in dir(ressl)


def test_public_functions_survive_their_modules_being_imported():
    # a submodule named like a public function would replace it on the package when imported
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(ressl.__path__):
        importlib.import_module(f"ressl.{info.name}")
    for name in ressl.__all__:
        assert not isinstance(getattr(ressl, name), type(ressl)), f"ressl.{name} is a module"


def test_every_subpackage_is_installed():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        "ressl." + p.parent.relative_to(root / "ressl").as_posix().replace("/", ".")
        for p in (root / "ressl").glob("*/**/__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


def test_deprecated_names_still_work_and_say_where_to_go():
    with pytest.warns(DeprecationWarning, match="TrainConfig.from_keywords"):
        assert ressl.resolve_settings(dataset="cifar10")["queue_size"] == 4096
    with pytest.warns(DeprecationWarning, match="DATASETS"):
        assert ressl.DATASET_DEFAULTS["stl10"]["ema_momentum"] == 0.996


def test_a_broken_dependency_is_not_reported_as_missing_torch():
    code = """
import importlib.abc, sys
class NoSafetensors(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "safetensors":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, NoSafetensors())
try:
    from ressl import load_checkpoint
except ImportError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "blocked: safetensors" in out.stdout and "needs PyTorch" not in out.stdout
