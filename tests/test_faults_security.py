"""Faults and hostile files, for real: a disk that fills up during a save, a DataLoader worker that raises or dies,
checkpoints that carry code, and secrets that must not reach the logs. (A checkpoint write killed half-way is
tests/test_resume.py; NaN losses are tests/test_lit_module.py.)"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import REPO
from tests.test_lit_module import corpus, make, trainer  # noqa: F401  (corpus is a fixture)
from unigendet.checkpoint.lightning_io import AtomicCheckpointIO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


#####################################################################################################
# disk full
#####################################################################################################


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MB tmpfs (needs root, which CI has); skipped with the reason otherwise."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk) -> None:
    """Write ``disk/filler`` until the filesystem is full (ENOSPC)."""
    import errno

    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_disk_full_during_a_save_fails_clearly_and_keeps_the_last_checkpoint(corpus, small_disk, tmp_path):  # noqa: F811
    import errno

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Fill(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:  # ModelCheckpoint runs after the user's callbacks
                fill(small_disk)

    lit, dm = make(corpus, ema_decay=None)
    ckpt = ModelCheckpoint(dirpath=small_disk, every_n_train_steps=1, save_top_k=0, save_last=True)
    tr = trainer(tmp_path, 4, enable_checkpointing=True, callbacks=[Fill(), ckpt])
    with pytest.raises(OSError, match=r"could not write checkpoint .*last\.ckpt.*the previous checkpoint there is "
                                      r"unchanged") as info:
        tr.fit(lit, datamodule=dm)
    assert info.value.errno == errno.ENOSPC
    assert not (small_disk / ".last.ckpt.partial").exists()  # the failed partial file is removed
    (small_disk / "filler").unlink()
    kept = torch.load(small_disk / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 1  # the last good checkpoint, complete and loadable


#####################################################################################################
# DataLoader workers
#####################################################################################################

WORKER_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from data_modules import DetectionDataModule

    class Faulty(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)
            if sys.argv[1] == "raise":
                raise ValueError("bad state in the worker's own code")
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
            yield torch.zeros(1)

    loader = DetectionDataModule(num_workers=1).loader(Faulty())
    try:
        for _ in loader:
            pass
    except Exception as e:
        print("CAUGHT", type(e).__name__, str(e).replace("\\n", " | "))
        sys.exit(3)
    print("NO ERROR")
""")


@pytest.mark.parametrize("fault", ["raise", "sigkill"])
def test_a_dataloader_worker_fault_is_an_error_with_its_cause_not_a_hang(fault):
    proc = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, fault], env=ENV, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    if fault == "raise":  # the worker's traceback travels with the error
        assert "CAUGHT ValueError" in out and "Caught ValueError in DataLoader worker process 0" in out
        assert "bad state in the worker's own code" in out and "Traceback" in out
    else:
        assert "CAUGHT RuntimeError" in out and ("killed by signal" in out or "exited unexpectedly" in out)


#####################################################################################################
# hostile checkpoints
#####################################################################################################

EVIL = textwrap.dedent("""
    import sys, torch
    class Payload:
        def __reduce__(self):  # unpickling this calls open(marker, "w"): code running at load time
            return (open, (sys.argv[2], "w"))
    torch.save({"state_dict": {}, "payload": Payload()}, sys.argv[1])
""")


@pytest.fixture
def evil_ckpt(tmp_path):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "PWNED"
    subprocess.run([sys.executable, "-c", EVIL, str(path), str(marker)], env=ENV, check=True)
    # the payload is real: an unrestricted load runs it (in a throwaway process)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"], env=ENV,
                   check=True)
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_checkpoints_with_pickled_code_are_refused_everywhere(evil_ckpt, tmp_path):
    import pickle

    from unigendet.checkpoint.folders import CheckpointError
    from unigendet.checkpoint.loading import load_lightning_checkpoint

    path, marker = evil_ckpt
    io = AtomicCheckpointIO()
    with pytest.raises(pickle.UnpicklingError):  # Lightning's resume path (fit/validate/test --ckpt_path)
        io.load_checkpoint(path)
    with pytest.raises(ValueError, match="weights_only=True only"):
        io.load_checkpoint(path, weights_only=False)
    with pytest.raises(CheckpointError, match="refused"):  # detect / generate / export
        load_lightning_checkpoint(path)
    folder = tmp_path / "last.ckpt"  # a distributed checkpoint whose meta.pt carries the payload
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    os.replace(path, folder / "meta.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_lightning_checkpoint(folder)
    proc = subprocess.run([sys.executable, "-m", "unigendet", "export", "--ckpt", str(folder), "--out",
                           str(tmp_path / "out")], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "refused" in proc.stderr
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            yield name, node


def test_source_loads_nothing_that_could_run_code():
    """Every ``torch.load`` passes ``weights_only=True``; no pickle loads, eval/exec or ``trust_remote_code``."""
    offences = []
    for folder in ("unigendet", "data_modules", "callbacks", "bench"):
        for file in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(file.read_text())
            for name, call in _calls(tree):
                where = f"{file.relative_to(REPO)}:{call.lineno}"
                keywords = {k.arg: k.value for k in call.keywords}
                if name == "load" and ast.unparse(call.func).startswith("torch."):
                    value = keywords.get("weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        offences.append(f"{where}: torch.load without weights_only=True")
                if name in ("loads", "load") and ast.unparse(call.func).startswith(("pickle.", "dill.", "joblib.")):
                    offences.append(f"{where}: {ast.unparse(call.func)}")
                if name in ("eval", "exec") and isinstance(call.func, ast.Name):
                    offences.append(f"{where}: {name}()")
                if "trust_remote_code" in keywords:
                    offences.append(f"{where}: trust_remote_code")
    assert not offences, offences


#####################################################################################################
# secrets
#####################################################################################################


def test_the_wandb_api_key_reaches_no_log_config_or_checkpoint(corpus, tmp_path):  # noqa: F811
    from tests.test_resume import fit_command

    secret = "unigendet-test-secret-3f9c2a7b1e"
    root = tmp_path / "run"
    cmd = fit_command(corpus, root, "--trainer.max_steps=2", "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
                      "--trainer.logger.offline=true", f"--trainer.logger.save_dir={root}",
                      "--trainer.logger.project=secret-check")
    cmd = [a for a in cmd if a != "--trainer.logger=false"]
    env = {**ENV, "WANDB_API_KEY": secret, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           **{v: str(tmp_path / v.lower()) for v in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                                                      "WANDB_CONFIG_DIR")}}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "last.ckpt" for p in files)
    assert any(p.name == "config.yaml" for p in files)
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert secret not in proc.stdout + proc.stderr
