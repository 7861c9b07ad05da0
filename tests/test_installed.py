"""The user's path: the wheel installed (not editable) into its own virtual environment, every command run from a
folder outside the checkout, with the settings the package ships."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from fsseg.adapt.config import TrainingConfig

pytestmark = pytest.mark.long

VENV = REPO / ".venv-installed"
TORCH = os.environ.get("FSSEG_TORCH", "torch==2.13.0")
TORCH_INDEX = os.environ.get("FSSEG_TORCH_INDEX", "")


def run(command: list, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, encoding="utf-8", timeout=1200, env=env
    )
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a virtual environment holding the freshly built wheel (the environment is kept between
    runs; the wheel is reinstalled every time)."""
    # Built from a copy of the working tree's files (not build/ leftovers, which a wheel would pick up).
    source, wheels = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source])
    wheel = next(wheels.glob("fsseg-*.whl"))
    python = VENV / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", VENV])
        run([python, "-m", "pip", "install", "-q", TORCH] + (["--index-url", TORCH_INDEX] if TORCH_INDEX else []))
    run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel])
    run([python, "-m", "pip", "install", "-q", wheel])  # its dependencies, when they are missing
    return VENV / "bin"


def test_the_wheel_installs_one_top_level_name_fsseg(installed, tmp_path):
    listing = (
        "from importlib.metadata import files; "
        "print('\\n'.join(sorted({f.parts[0] for f in files('fsseg') if f.parts[0] != '..'})))"
    )
    found = run([installed / "python", "-c", listing], tmp_path).stdout.split()
    assert [name for name in found if not name.endswith(".dist-info")] == ["fsseg"], found
    run([installed / "python", "-c", "import fsseg.pretrain.engine, fsseg.adapt.engine"], tmp_path)


def test_installed_commands_run_from_the_users_folder_with_the_shipped_settings(installed, tmp_path):
    work = tmp_path / "my_project"  # outside the checkout, without configs/ or data_lists/
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FSSEG_DATASET_SPECS")}
    located = run([installed / "python", "-c", "import fsseg; print(fsseg.__file__)"], work, env).stdout
    assert str(VENV) in located and str(REPO / "fsseg") not in located

    def fsseg(command: str, *args) -> subprocess.CompletedProcess:
        return run([installed / f"fsseg-{command}", *args], work, env)

    assert "btcv" in fsseg("make-list", "--help").stdout  # the shipped dataset specs
    fsseg(
        "phantom",
        "--out",
        "data",
        "--source-cases",
        "2",
        "--target-train",
        "2",
        "--target-test",
        "1",
        "--spacing",
        "4",
        "4",
        "4",
        "--no-progress",
    )
    fsseg("check-data", *sorted(str(p) for p in (work / "data").glob("*.json")), "--no-progress")
    # configs/pretrain/tiny.yaml is not in this folder: the shipped one is read.
    fsseg(
        "pretrain",
        "--config",
        "configs/pretrain/tiny.yaml",
        "--out",
        "pretrain",
        "--no-progress",
        "--data-list",
        *(f"data/phantom_source_{s}.json" for s in "abc"),
        "--set",
        "optim.epochs=1",
        "--set",
        "preprocessing.spacing=[4, 4, 4]",
        "--set",
        "preprocessing.roi=[32, 32, 32]",
    )
    adapted = fsseg(
        "adapt",
        "--checkpoint",
        "pretrain/checkpoint_latest.pt",
        "--data-list",
        "data/phantom_target.json",
        "--organ",
        "gallbladder",
        "--shots",
        "1",
        "--method",
        "lp",
        "--seeds",
        "1",
        "--out",
        "adapt",
        "--set",
        "pictures=false",
        "--no-progress",
    )
    used = json.loads((work / "adapt" / "results.json").read_text())["method_settings"]["lp"]["training"]
    shipped = yaml.safe_load((REPO / "configs" / "adapt" / "lp.yaml").read_text())["training"]
    built_in = asdict(TrainingConfig())
    # The shipped file differs from the built-in settings, so a run that missed it would fail here.
    assert {k for k in shipped if shipped[k] != built_in[k]} >= {"epochs", "crops_per_volume", "voxel_stride"}
    assert {k: used[k] for k in shipped} == pytest.approx(shipped)
    assert f"lp: settings from {VENV}" in adapted.stderr
    fsseg(
        "predict",
        "-i",
        "data/phantom_target.json",
        "-o",
        "predict",
        "-m",
        "pretrain/checkpoint_latest.pt",
        "--adapter",
        "adapt/adapters/gallbladder_lp_k1_s0.safetensors",
        "--no-progress",
    )
    fsseg(
        "evaluate",
        "--pred",
        "predict",
        "--data-list",
        "data/phantom_target.json",
        "-o",
        "evaluate",
        "--no-plot",
        "--no-progress",
    )
    summary = json.loads((work / "evaluate" / "summary.json").read_text())
    assert summary["cases"] == 1 and not summary["failed_cases"]

    # The real CT shipped in the wheel: written here, checked, and the model adapted to its liver.
    fsseg("sample-data", "--out", "samples")
    fsseg("check-data", *sorted(str(p) for p in (work / "samples").glob("*.json")), "--no-progress")
    fsseg(
        "adapt",
        "--checkpoint",
        "pretrain/checkpoint_latest.pt",
        "--data-list",
        "samples/sample_ct_liver_fewshot.json",
        "--organ",
        "liver",
        "--shots",
        "1",
        "--method",
        "lp",
        "--seeds",
        "1",
        "--out",
        "adapt_real",
        "--set",
        "method_configs=configs/adapt/demo",
        "--set",
        "pictures=false",
        "--no-progress",
    )
    rows = json.loads((work / "adapt_real" / "results.json").read_text())["rows"]
    assert [(r["method"], r["shots"], r["case"]) for r in rows] == [("lp", 1, "lits_117_crop128")]
