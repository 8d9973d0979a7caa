"""Exact resume: a co-evolution run killed with SIGKILL at three random steps (once while a checkpoint is being
written) and resumed each time with ``--ckpt_path last`` repeats the per-step losses of an uninterrupted run
exactly (CPU, fp32), and leaves only the checkpoints its ModelCheckpoint keeps; checkpoint writes are atomic."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from callbacks import read_step_log
from tests.conftest import REPO
from tests.inotify import Inotify

EXPERIMENTS = REPO / "experiments"
SMALL = {"mot": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_dim": 128},
         "vit": {"dim": 32, "n_layers": 1, "n_heads": 2, "mlp_dim": 64}, "head": {"diga_layer": 1}}
STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from unigendet.demo.corpus import SMALL as SMALL_CORPUS
    from unigendet.demo.corpus import build_demo_corpus

    out = tmp_path_factory.mktemp("demo_corpus")
    build_demo_corpus(out, seed=0, **{k: v for k, v in SMALL_CORPUS.items() if k in ("n_real", "n_fake_per_family")})
    return out


def trainer_config(root: Path, *callbacks: dict) -> Path:
    """``root/trainer.yaml``: a checkpoint every step into ``root/ckpt`` (``last.ckpt`` too), plus ``callbacks``."""
    path = root / "trainer.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 1, "save_last": True, "save_top_k": 1,
                       "monitor": None}}, *callbacks]}}))
    return path


def fit_command(corpus: Path, root: Path, *extra: str, devices: int = 1, workers: int = 1) -> list[str]:
    """``python -m unigendet fit`` of the co-evolution stage (DIGA with a refreshed snapshot teacher, fresh fakes,
    EMA, DataLoader workers) on a test-sized model, checkpointing every step, logging every step's losses.
    ``devices > 1``: that many CPU processes (gloo) under FSDP2 in fp32, every rank reading the same batches, so
    the run must repeat a single process's losses."""
    if devices > 1:
        extra = ("--trainer.strategy=fsdp2", "--model.fsdp.param_dtype=fp32", "--data.replicate_across_ranks=true",
                 "--model.rank_seeds=false", *extra)
    trainer_cfg = trainer_config(root, {"class_path": "callbacks.StepLog",
                                        "init_args": {"path": str(root / "steps.jsonl")}})
    det = corpus / "detection"
    return [sys.executable, "-m", "unigendet", "fit",
            *[f"--config={EXPERIMENTS / c}" for c in ("base.yaml", "gduf.yaml", "coevolve.yaml")],
            f"--config={trainer_cfg}",
            "--model.model_name=demo", f"--model.model_overrides={SMALL}", "--model.init_from=null",
            "--model.ema_decay=0.9", "--model.stage.diga_layer=1", "--model.stage.teacher_refresh=3",
            "--model.stage.fresh_fakes_every=2", "--model.stage.fresh_fakes=2",
            "--model.stage.fresh_fake_px=32", "--model.stage.fresh_fake_steps=2",
            f"--trainer.max_steps={STEPS}", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
            "--trainer.logger=false",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
            f"--data.train={det / 'train.json'}", f"--data.val={det / 'val.json'}",
            f"--data.tokenizer={corpus / 'tokenizer.json'}", "--data.image_root=null", f"--data.num_workers={workers}",
            "--data.token_budget=900", "--data.packs_per_epoch=5",
            f"--data.gen.train={corpus / 't2i/train.jsonl'}", "--data.gen.token_budget=400",
            "--data.gen.image_column=image", "--data.gen.caption_column=caption", *extra]


def run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}"
    return proc


def test_three_preemptions_one_during_a_save_then_resume_repeat_the_uninterrupted_losses(corpus, tmp_path):
    ref_root, cut_root = tmp_path / "reference", tmp_path / "interrupted"
    run(fit_command(corpus, ref_root), tmp_path / "reference.log")
    reference = read_step_log(ref_root / "steps.jsonl")
    assert sorted(reference) == list(range(1, STEPS + 1))
    logged = set().union(*reference.values())
    assert {"train/loss_det", "train/loss_mse", "train/loss_diga", "train/loss_fresh"} <= logged

    kills = preempt_three_times(lambda *extra: fit_command(corpus, cut_root, *extra), cut_root, tmp_path)
    resumed = read_step_log(cut_root / "steps.jsonl")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    diffs = differing(reference, resumed)
    assert not diffs, f"{kills}; differing (step, key): {diffs}"
    assert_retention(cut_root / "ckpt")


def preempt_three_times(command, root: Path, logs: Path) -> str:
    """SIGKILL a run three times at random steps, the second time while a checkpoint is being written, resuming
    with ``--ckpt_path last`` after each; the fourth run finishes. ``command(*extra)`` builds the command line.
    Returns what happened (for failure messages)."""
    rng = random.Random()
    first = rng.randint(1, 2)
    second = rng.randint(first + 1, first + 2)
    third = rng.randint(second + 1, STEPS - 1)
    steps, done = root / "steps.jsonl", []
    for i, (after, during_save) in enumerate([(first, False), (second, True), (third, False)]):
        extra = ("--ckpt_path=last",) if i else ()
        got = run_and_kill(command(*extra), steps, after, logs / f"killed{i}.log",
                           during_save=root / "ckpt" if during_save else None)
        done.append(f"kill {i + 1} after {after} steps{' during a save' if during_save else ''} (logged {got})")
    run(command("--ckpt_path=last"), logs / "final.log")
    return "; ".join(done)


def assert_retention(ckpt: Path) -> None:
    """ModelCheckpoint(save_top_k=1, save_last=True): the newest step checkpoint and last.ckpt, nothing else (no
    partial files of the killed writers)."""
    names = sorted(p.name for p in ckpt.iterdir())
    assert len(names) == 2 and re.fullmatch(rf"epoch=\d+-step={STEPS}\.ckpt", names[0]) and names[1] == "last.ckpt", \
        names


def run_and_kill(cmd: list[str], steps: Path, kill_after: int, log: Path, during_save: Path | None = None) -> int:
    """Start ``cmd``, SIGKILL its whole process group (trainer, other ranks, DataLoader workers) once ``kill_after``
    distinct steps are logged: at once, or with ``during_save`` (the checkpoint folder) the moment the next
    checkpoint write creates its file (a hidden ``.<name>.partial``; for a distributed checkpoint, the first shard
    inside it), which must still be there afterwards. Returns the number of distinct steps logged."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out, Inotify() as notify:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=out, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if steps.exists() and len(read_step_log(steps)) >= kill_after:
                break
            time.sleep(0.02)
        partial = None
        if during_save is not None and proc.poll() is None:
            notify.watch(during_save)
            while partial is None and time.time() < deadline and proc.poll() is None:
                for path in notify.created(0.5):
                    if path.name.startswith(".") and path.name.endswith(".partial"):
                        partial = path
                        break
            if partial is not None and partial.is_dir():  # a distributed checkpoint: wait for its first shard
                notify.watch(partial)
                while proc.poll() is None and not notify.created(0.5) and time.time() < deadline:
                    pass
        assert proc.poll() is None, f"the run ended before step {kill_after}: see {log}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if during_save is not None:
        assert partial is not None and partial.exists(), f"no checkpoint write was caught in progress: {partial}"
    done = len(read_step_log(steps))
    assert done < STEPS, "the kill came too late to interrupt anything"
    return done


def differing(reference: dict, other: dict, rel: float = 0.0) -> dict:
    """{(step, key): (reference value, other value)} where they differ by more than ``rel`` (relative)."""
    out = {}
    for step, row in reference.items():
        for key, ref in row.items():
            val = other.get(step, {}).get(key)
            if val is None or abs(val - ref) > rel * abs(ref):
                out[(step, key)] = (ref, val)
    return out


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_intact(tmp_path):
    """AtomicCheckpointIO writes a partial file next to the target and renames it into place: a writer killed
    mid-write leaves the old checkpoint (complete, loadable), never a truncated file under the real name."""
    target = tmp_path / "last.ckpt"
    script = (
        "import sys, torch\n"
        "from unigendet.checkpoint.lightning_io import AtomicCheckpointIO\n"
        "n = int(sys.argv[2])\n"
        "AtomicCheckpointIO().save_checkpoint({'version': n, 'blob': torch.full((n * 2_000_000,), float(n))},"
        " sys.argv[1])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script, str(target), "1"], check=True, env=env, timeout=300)
    killed_mid_write = 0
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target), "40"], env=env)
        # wait until the writer has started writing (a temporary file appears next to the target), then kill
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (tmp_path / ".last.ckpt.partial").exists():
                time.sleep(0.01 * attempt)
                break
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_mid_write += 1
        proc.wait()
        import torch

        ckpt = torch.load(target, weights_only=True)
        assert ckpt["version"] in (1, 40)
        assert bool((ckpt["blob"] == float(ckpt["version"])).all()) and ckpt["blob"].numel() == ckpt["version"] * 2e6
        if ckpt["version"] == 40:  # a writer finished: start again from the small one
            subprocess.run([sys.executable, "-c", script, str(target), "1"], check=True, env=env, timeout=300)
    assert killed_mid_write, "no writer was ever caught mid-write"


def test_the_lightning_module_installs_the_atomic_io(tmp_path):
    import lightning as L

    from unigendet.checkpoint.lightning_io import AtomicCheckpointIO
    from unigendet.training.module import LitUniGenDet

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, default_root_dir=tmp_path)
    lit = LitUniGenDet(model_name="tiny")
    trainer.strategy.connect(lit)
    lit.trainer = trainer
    lit.setup("fit")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
