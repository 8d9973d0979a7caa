"""Damaged checkpoints are found, not trained on: checksums on every file the project writes (torch's zip CRC-32s
in single files, SHA256SUMS in folders), a one-line error naming the file from every command, and ``--ckpt_path
last`` falling back to the newest intact checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_resume import corpus, fit_command, run  # noqa: F401  (corpus is a fixture)
from unigendet.checkpoint.folders import CheckpointError
from unigendet.checkpoint.integrity import SUMS, seal, verify_file, verify_folder

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def damage(path: Path, how: str) -> None:
    """``flip``: invert 64 bytes in the middle (what a bad disk or a bad copy does); ``truncate``: keep the first
    half (an interrupted copy)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    if how == "flip":
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    else:
        del data[mid:]
    path.write_bytes(bytes(data))


#####################################################################################################
# The checks themselves
#####################################################################################################


def test_a_torch_file_is_checked_against_its_crcs(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"w": torch.randn(50_000), "step": 3}, path)
    assert verify_file(path) is True
    flipped, cut = tmp_path / "flipped.ckpt", tmp_path / "cut.ckpt"
    shutil.copy(path, flipped)
    shutil.copy(path, cut)
    damage(flipped, "flip")
    damage(cut, "truncate")
    assert torch.load(flipped, weights_only=True)["step"] == 3  # torch alone loads the damaged file without a word
    with pytest.raises(CheckpointError, match=r"flipped\.ckpt: damaged: its member .* fails its CRC-32 check"):
        verify_file(flipped)
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: damaged or truncated"):
        verify_file(cut)
    legacy = tmp_path / "legacy.ckpt"  # torch's pre-zip format carries no checksums: let through, as before
    torch.save({"step": 1}, legacy, _use_new_zipfile_serialization=False)
    assert verify_file(legacy) is False


def test_a_sealed_folder_is_checked_file_by_file_and_sha256sum_agrees(tmp_path):
    for i in range(4):
        (tmp_path / f"part{i}.bin").write_bytes(os.urandom(10_000 + i))
    (tmp_path / "notes.txt").write_text("not listed, not checked")
    assert verify_folder(tmp_path) is False  # no SHA256SUMS: a folder written elsewhere loads as before
    seal(tmp_path, [f"part{i}.bin" for i in range(4)])
    check = subprocess.run(["sha256sum", "--check", "--strict", SUMS], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 4, check.stdout + check.stderr
    assert verify_folder(tmp_path) is True
    (tmp_path / "notes.txt").write_text("edited")
    damage(tmp_path / "part2.bin", "flip")
    names = sorted(f"part{i}.bin" for i in range(4))
    # split over 2 ranks: part2.bin is rank 0's share (every 2nd name from 0), rank 1 does not read it
    assert verify_folder(tmp_path, part=(1, 2)) is True
    with pytest.raises(CheckpointError, match=r"part2\.bin: damaged: its SHA-256 differs from the one in .*SHA256"):
        verify_folder(tmp_path, part=(0, 2))
    assert names[0::2] == ["part0.bin", "part2.bin"]
    (tmp_path / "part3.bin").unlink()
    with pytest.raises(CheckpointError, match=r"part3\.bin: missing"):
        verify_folder(tmp_path, part=(1, 2))  # every rank checks that every listed file is there


#####################################################################################################
# Every command, on a real training checkpoint and its export
#####################################################################################################


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("trained")
    run(fit_command(corpus, root, "--trainer.max_steps=3", workers=0), root / "fit.log")
    return root


def _stderr_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# truncation of the file itself is the unit test above; every command again on a truncated file is `make test-all`
@pytest.mark.parametrize("how", ["flip", pytest.param("truncate", marks=pytest.mark.slow)])
def test_every_command_refuses_a_damaged_checkpoint_in_one_line(corpus, trained, tmp_path, how):  # noqa: F811
    bad = tmp_path / "last.ckpt"
    shutil.copy(trained / "ckpt" / "last.ckpt", bad)
    damage(bad, how)
    image = next((corpus / "detection").rglob("*.png"))
    commands = {
        "export": ["export", "--ckpt", str(bad), "--out", str(tmp_path / "export")],
        "detect": ["detect", str(image), "--ckpt", str(bad), "--no-explain"],
        "generate": ["generate", "--ckpt", str(bad), "--prompt", "a cat", "--out", str(tmp_path / "gen"),
                     "--height", "32", "--width", "32", "--steps", "2"],
        "test": [*fit_command(corpus, tmp_path / "t", "--model.evaluation.gen_px=32", f"--ckpt_path={bad}",
                              workers=0)[3:]],
        "fit": [*fit_command(corpus, tmp_path / "f", f"--ckpt_path={bad}", workers=0)[3:]],
    }
    commands["test"][0] = "test"
    for name, args in commands.items():
        proc = subprocess.run([sys.executable, "-m", "unigendet", *args], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=300)
        line = _stderr_line(proc)
        assert proc.returncode == 2, f"{name}: rc {proc.returncode}\n{proc.stderr[-2000:]}"
        assert line.startswith(f"unigendet {name}: error: {bad}: damaged"), f"{name}: {line!r}"
        assert "Traceback" not in proc.stderr, f"{name}:\n{proc.stderr[-2000:]}"
    assert not (tmp_path / "export" / "model.safetensors.index.json").exists()  # nothing was exported


def test_an_export_is_sealed_and_a_damaged_shard_is_refused_on_load(trained, tmp_path):
    from unigendet.checkpoint.loading import load_model
    from unigendet.cli import main

    out = tmp_path / "export"
    assert main(["export", "--ckpt", str(trained / "ckpt" / "last.ckpt"), "--out", str(out), "--max-shard-gb",
                 "0.0002", "--no-progress"]) == 0
    listed = (out / SUMS).read_text()
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(p.name in listed for p in shards)
    assert all(name in listed for name in ("tokenizer.json", "config.json", "model.safetensors.index.json"))
    check = subprocess.run(["sha256sum", "--check", "--strict", SUMS], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    load_model(out)
    damage(shards[1], "flip")
    with pytest.raises(CheckpointError, match=rf"{shards[1].name}: damaged"):
        load_model(out)
    from unigendet.inference import UniGenDetPipeline

    with pytest.raises(CheckpointError, match=rf"{shards[1].name}: damaged"):
        UniGenDetPipeline.from_pretrained(out)


#####################################################################################################
# --ckpt_path last falls back
#####################################################################################################


def test_resume_from_last_skips_a_damaged_last_checkpoint(corpus, tmp_path):  # noqa: F811
    root = tmp_path / "run"
    run(fit_command(corpus, root, "--trainer.max_steps=3", workers=0), tmp_path / "fit.log")
    ckpt = root / "ckpt"
    [step_file] = [p for p in ckpt.glob("epoch=*.ckpt")]  # save_top_k=1: the newest step, besides last.ckpt
    damage(ckpt / "last.ckpt", "flip")
    cmd = fit_command(corpus, root, "--ckpt_path=last", "--trainer.max_steps=5", workers=0)
    proc = run(cmd, tmp_path / "resumed.log")
    out = proc.stdout + proc.stderr
    assert f"{ckpt / 'last.ckpt'}: damaged" in out
    assert f"resuming from the newest intact checkpoint instead: {step_file}" in out
    assert f"Restored all states from the checkpoint at {step_file}" in out
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == 5  # trained on, and saved intact
    # save_top_k=1 keeps the newest step, and Lightning keeps the checkpoint a run resumed from
    assert sorted(p.name for p in ckpt.iterdir()) == [step_file.name, "epoch=0-step=5.ckpt", "last.ckpt"]

    for p in ckpt.glob("*.ckpt"):  # nothing intact left: a clear error, not a fresh start or garbage
        damage(p, "truncate")
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no intact checkpoint to fall back to" in _stderr_line(proc), proc.stderr[-2000:]
