"""`unigendet demo` end to end at test size: corpus, training, held-out evaluation, samples, W&B offline run, and a
JSON summary as the last stdout line."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from PIL import Image

from unigendet.demo.runner import main_demo


def test_demo_runs_end_to_end_and_reports_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    out = tmp_path / "run"
    # Lightning's own log lines go to its handler's stream, which capsys does not see: listen on its logger
    lightning_lines: list[str] = []
    listener = logging.Handler()
    listener.emit = lambda record: lightning_lines.append(record.getMessage())
    logging.getLogger("lightning.pytorch").addHandler(listener)
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "level", logging.INFO)
    code = main_demo(["--out", str(out), "--small", "--panel", "2", "--samples", "2", "--sample-px", "32",
                      "--sample-steps", "2", "--fd-samples", "4", "--trainer.max_steps=3",
                      "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2", "--data.num_workers=0",
                      "--trainer.enable_progress_bar=false"])
    logging.getLogger("lightning.pytorch").removeHandler(listener)
    assert code == 0
    # no third-party noise: the final save names what it writes (it logged "`weights_only` was not set")
    assert not [line for line in lightning_lines if "weights_only" in line], lightning_lines
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    summary = json.loads(lines[-1])
    # the words say what the JSON says
    assert f"Detection: {100 * summary['heldout_acc']:.0f}% of {summary['heldout_images']} held-out images" \
        in captured.err
    assert f"block ratio {summary['block_ratio']:.2f}" in captured.err
    assert f"held-out real images {summary['fd_after']:.2f}, {summary['fd_before']:.2f} before training" in captured.err
    assert re.search(r"\[val\] step 3: acc \d\.\d{3} AUROC", captured.err), captured.err[-2000:]
    assert (out / "curves.png").is_file()
    assert {"heldout_acc", "heldout_f1", "heldout_auroc", "per_family", "heldout_rouge_l", "verdict_acc",
            "verdict_agreement", "no_verdict", "block_ratio", "fd_before", "fd_after", "train_seconds", "checkpoint",
            "samples"} <= set(summary)
    # two different networks (initial and trained weights) give different samples, both at a positive distance
    assert summary["fd_before"] > 0 and summary["fd_after"] > 0 and summary["fd_before"] != summary["fd_after"]
    assert 0.0 <= summary["heldout_acc"] <= 1.0 and 0.0 <= summary["heldout_f1"] <= 1.0
    assert 0.0 <= summary["heldout_auroc"] <= 1.0  # the --small test split holds both classes
    assert set(summary["per_family"]) == {"real", "gan_upsample", "spectral", "diffusion_like", "splice"}
    assert all(0.0 <= v <= 1.0 for v in summary["per_family"].values())
    assert 0.0 <= summary["verdict_acc"] <= 1.0 and 0.0 <= summary["verdict_agreement"] <= 1.0
    assert 0 <= summary["no_verdict"] <= 2 and summary["block_ratio"] > 0
    assert 0.0 <= summary["heldout_rouge_l"] <= 1.0 and summary["train_seconds"] > 0
    assert summary["heldout_images"] > 0 and summary["explained"] == 2
    assert (out / "corpus" / "manifest.json").exists()
    assert summary["checkpoint"].endswith(".ckpt") and Path(summary["checkpoint"]).exists()
    grid = Image.open(summary["samples"])
    assert grid.size[0] == 256 and grid.size[1] > 128  # 2 samples of 32 px shown at 128 px side by side, captions below
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert summary["wandb"] and str(out / "wandb") in summary["wandb"]


def test_demo_scores_the_final_weights_when_max_steps_is_off_the_checkpoint_interval(tmp_path, monkeypatch):
    """ModelCheckpoint(every_n_train_steps=2) with max_steps=3 leaves last.ckpt at step 2; the demo scores step 3."""
    import torch
    import yaml

    from unigendet.demo.runner import REPO_EXPERIMENTS, build_corpus, train

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    cfg = yaml.safe_load((REPO_EXPERIMENTS / "demo.yaml").read_text())
    (checkpointing,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    checkpointing["init_args"]["every_n_train_steps"] = 2
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    corpus = build_corpus(out, 0, small=True)
    ckpt, _, _ = train(out, corpus, config, ["--model.init_ae_from=null", "--trainer.max_steps=3",
                                             "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
                                             "--data.num_workers=0", "--trainer.enable_progress_bar=false"])
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 3
    assert len(list(ckpt.parent.glob("*step=2.ckpt"))) == 1  # the interval checkpoint is still there
