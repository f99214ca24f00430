"""Shared by the bench scripts: run a recipe (a dict) in a subprocess once, reusing a finished run directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def train(recipe: dict, out: Path, name: str) -> Path:
    """Write `recipe` to `out/<name>.yaml` and train it into `out/<name>/` unless that run already exists."""
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = out / name
    if not (run / "recipe.resolved.yaml").is_file():
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run([sys.executable, "-m", "posttrain", "train", str(path), "--run-dir", str(run)],
                       cwd=REPO, env=env, check=True)
    return run
