"""The README's `make demo`, in a reduced form: every step runs and hands its outputs to the next."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.long
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_reduced_demo_runs_every_step(tmp_path):
    venv = Path(sys.prefix)
    command = [
        "make", "-C", str(REPO), "demo", f"VENV={venv}", "-o", f"{venv}/.fsseg-installed",
        f"DEMO_DIR={tmp_path / 'demo'}",
        "DEMO_PHANTOM_ARGS=--source-cases 1 --target-train 2 --target-test 1 --spacing 4 4 4",
        "DEMO_PRETRAIN_ARGS=--set optim.epochs=1 --set preprocessing.spacing=[4,4,4] --set preprocessing.roi=[32,32,32]",
        # the last --shots wins: K=1 alone (the K=5 run adds half a minute and no step)
        "DEMO_ADAPT_ARGS=--seeds 1 --shots 1 --method lp --set overlap=0.25",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in range(1, 7):
        assert f"== {step}/6" in result.stdout
    demo = tmp_path / "demo"
    assert (demo / "pretrain" / "checkpoint_latest.pt").is_file()
    best = json.loads((demo / "adapt" / "results.json").read_text())["best"]
    assert best["method"] == "lp" and Path(best["adapter"]).is_file()
    assert json.loads((demo / "predict" / "labels.json").read_text()) == {"0": "background", "1": "gallbladder"}
    summary = json.loads((demo / "evaluate" / "summary.json").read_text())
    assert summary["cases"] == 1 and not summary["failed_cases"]
    assert "Dice on the test cases, gallbladder" in result.stdout
