"""Packaging invariants: every package is listed in pyproject, and `import posttrain` stays light."""

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "posttrain").rglob("__init__.py")}
    found.add("posttrain.rewards")
    assert found == listed
    assert config["package-dir"] == {"posttrain.rewards": "rewards"}


def test_import_posttrain_imports_no_heavy_backend():
    code = ("import sys, posttrain, posttrain.cli, posttrain.errors; "
            "heavy = [m for m in ('vllm', 'deepspeed', 'torch', 'transformers') if m in sys.modules]; "
            "print(heavy); assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
