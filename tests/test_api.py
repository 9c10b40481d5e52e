import subprocess
import sys

import ressl


def test_every_public_name_resolves():
    assert len(ressl.__all__) == len(set(ressl.__all__))
    for name in ressl.__all__:
        assert getattr(ressl, name) is not None, name


def test_core_import_stays_free_of_cli_and_onnx():
    code = "import ressl, sys; print(sorted(m for m in ('onnx', 'onnxruntime', 'typer', 'rich') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
