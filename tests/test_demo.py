"""The README's `make demo` on the sample CT and `make demo-phantom`, in reduced forms: every step runs and hands
its outputs to the next."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.long, pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")]
REDUCED_PRETRAINING = "--set optim.epochs=1 --set preprocessing.spacing=[4,4,4] --set preprocessing.roi=[32,32,32]"


def make(target: str, *settings: str) -> subprocess.CompletedProcess:
    venv = Path(sys.prefix)
    command = ["make", "-C", str(REPO), target, f"VENV={venv}", "-o", f"{venv}/.fsseg-installed", *settings]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in range(1, 7):
        assert f"== {step}/6" in result.stdout
    return result


def test_reduced_real_ct_demo_runs_every_step_and_ends_with_what_it_measured(tmp_path):
    demo = tmp_path / "demo"
    # the last --shots and --method win: K=1 with two methods (the full demo adds K=2 and three methods, no step)
    result = make(
        "demo",
        f"DEMO_DIR={demo}",
        f"DEMO_PRETRAIN_ARGS={REDUCED_PRETRAINING}",
        "DEMO_ADAPT_ARGS=--shots 1 --method lp ft --set overlap=0.25",
    )
    assert (demo / "data" / "ct" / "README.md").is_file() and (demo / "pretrain" / "model.pt").is_file()
    best = json.loads((demo / "adapt" / "results.json").read_text())["best"]
    assert best["method"] in ("lp", "ft") and Path(best["adapter"]).is_file()
    assert json.loads((demo / "predict" / "labels.json").read_text()) == {"0": "background", "1": "liver"}
    summary = json.loads((demo / "evaluate" / "summary.json").read_text())
    assert summary["cases"] == 1 and not summary["failed_cases"]
    ending = result.stdout[result.stdout.index("Done.") :]
    assert "Dice on the test cases, liver" in ending and "s/run" in ending
    assert "Measured on liver: the highest mean Dice at K=1" in ending and "full fine-tuning" in ending


def test_reduced_phantom_demo_runs_every_step(tmp_path):
    demo = tmp_path / "demo"
    make(
        "demo-phantom",
        f"DEMO_PHANTOM_DIR={demo}",
        "DEMO_PHANTOM_ARGS=--source-cases 1 --target-train 2 --target-test 1 --spacing 4 4 4",
        f"DEMO_PRETRAIN_ARGS={REDUCED_PRETRAINING}",
        "DEMO_ADAPT_ARGS=--seeds 1 --shots 1 --method lp --set overlap=0.25",
    )
    assert (demo / "pretrain" / "checkpoint_latest.pt").is_file()
    best = json.loads((demo / "adapt" / "results.json").read_text())["best"]
    assert best["method"] == "lp" and Path(best["adapter"]).is_file()
    assert json.loads((demo / "predict" / "labels.json").read_text()) == {"0": "background", "1": "gallbladder"}
    summary = json.loads((demo / "evaluate" / "summary.json").read_text())
    assert summary["cases"] == 1 and not summary["failed_cases"]
