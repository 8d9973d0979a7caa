"""The command line, run as users run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, parity_fixture_dirs
from unigendet.cli import main


def test_info_preset_reports_reference_parameter_counts(capsys):
    assert main(["info", "--preset", "bagel-7b-mot"]) == 0
    out = json.loads(capsys.readouterr().out)
    counts = out["parameters"]
    # numbers from bagel_keys.txt (llm_und_expert / llm_gen_expert include their final norm)
    assert counts["decoder.und"] == counts["decoder.gen"] == 6_525_628_928
    assert counts["vit"] == 402_552_736
    assert counts["total"] - counts["vae"] == 14_726_341_218
    assert out["config"]["mot"]["dim"] == 3584


def test_info_loads_a_bagel_folder(capsys):
    folders = parity_fixture_dirs()
    if not folders:
        pytest.skip("no parity fixture folder")
    assert main(["info", "--bagel-dir", str(folders[0]), "--load"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)["load_report"]
    assert report["missing"] == [] and report["unexpected"] == [] and report["loaded"] > 100
    assert "loaded" in captured.err


def test_info_on_a_non_model_folder_fails_clearly(tmp_path, capsys):
    assert main(["info", "--bagel-dir", str(tmp_path)]) == 2
    assert "llm_config.json" in capsys.readouterr().err


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "unigendet", "info", "--preset", "tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["name"] == "tiny"


def test_plot_draws_a_runs_losses(tmp_path, capsys):
    from PIL import Image

    steps = tmp_path / "steps.jsonl"
    steps.write_text("".join(json.dumps({"step": i, "train/loss_det": 0.7 - 0.01 * i, "train/loss_mse": 1.0 / i})
                             + "\n" for i in range(1, 30)))
    assert main(["plot", str(steps), "--out", str(tmp_path / "losses.png")]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(tmp_path / "losses.png")}
    assert Image.open(tmp_path / "losses.png").size[0] > 300
    assert main(["plot", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
