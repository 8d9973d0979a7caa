"""W&B never stops training, for real: an offline W&B run whose service process is SIGKILLed mid-run, and one whose
run folder's disk fills up mid-run, both train to ``max_steps``, write their checkpoints, say once what W&B lost,
and keep every step in ``steps.jsonl``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from callbacks import read_step_log
from tests.conftest import REPO
from tests.test_faults_security import fill, small_disk  # noqa: F401  (small_disk is a fixture)
from tests.test_resume import corpus, fit_command  # noqa: F401  (corpus is a fixture)

STEPS = 12


def _command(corpus: Path, root: Path) -> list[str]:  # noqa: F811
    """The co-evolution test run with the base stack's own WandbLogger (offline: no credentials), its files under
    ``root``; metrics logged every step, the run folder probed every second."""
    cmd = fit_command(corpus, root, f"--trainer.max_steps={STEPS}", "--trainer.log_every_n_steps=1",
                      f"--trainer.logger.init_args.save_dir={root}", "--trainer.logger.init_args.probe_every_s=1",
                      workers=0)
    return [a for a in cmd if a != "--trainer.logger=false"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("WANDB_SILENT", None)  # unigendet sets it itself
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        env[var] = str(tmp_path / var.lower())
    env.pop("WANDB_DIR", None)  # the logger's save_dir decides where the run folder goes
    return env


def _run_with_fault(cmd: list[str], env: dict, steps: Path, fault, log: Path) -> subprocess.CompletedProcess:
    """Run ``cmd``; once 3 steps are logged, call ``fault(pid)``; wait for the end."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if steps.exists() and len(steps.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the fault: {log.read_text()[-3000:]}"
        fault(proc.pid)
        proc.wait(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), "")


def _check_trained_through(root: Path, proc: subprocess.CompletedProcess, cause: str) -> None:
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    assert sorted(read_step_log(root / "steps.jsonl")) == list(range(1, STEPS + 1))
    assert torch.load(root / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == STEPS
    assert out.count("W&B stopped working at step") == 1, out[-3000:]
    stopped = next(line for line in out.splitlines() if "W&B stopped working" in line)
    assert cause in stopped, stopped
    assert "W&B lost" in out and "logging calls" in out
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    assert list(root.glob("wandb/offline-run-*/run-*.wandb"))  # what W&B wrote before the fault stays


def test_killing_the_wandb_service_costs_log_lines_not_the_run(corpus, tmp_path):  # noqa: F811
    root = tmp_path / "run"
    killed = []

    def kill_service(pid: int) -> None:
        # W&B starts its service in a session of its own: look for it among the trainer's children
        found = subprocess.run(["pgrep", "-P", str(pid), "-f", "wandb-core"], capture_output=True, text=True)
        for p in found.stdout.split():
            os.kill(int(p), signal.SIGKILL)
            killed.append(p)

    proc = _run_with_fault(_command(corpus, root), _env(tmp_path), root / "steps.jsonl", kill_service,
                           tmp_path / "run.log")
    assert killed, "no W&B service process was found to kill"
    _check_trained_through(root, proc, "Connection")


def test_a_full_disk_under_the_wandb_run_folder_costs_log_lines_not_the_run(corpus, small_disk, tmp_path):  # noqa: F811
    root = tmp_path / "run"
    root.mkdir()
    (root / "wandb").symlink_to(small_disk)  # W&B writes <save_dir>/wandb/...; the checkpoints stay on another disk

    proc = _run_with_fault(_command(corpus, root), _env(tmp_path), root / "steps.jsonl", lambda _pid: fill(small_disk),
                           tmp_path / "run.log")
    _check_trained_through(root, proc, "No space left on device")
