"""Slurm preemption with SafeRequeue: fast checks without Slurm, and a REAL requeue cycle on a one-node Slurm.

Without Slurm (always run, BoringModel, seconds):
* signal names / numbers, array-job ids; a failing or missing ``scontrol`` raises with its message;
* the handler does nothing in a forked child (a DataLoader worker), sets the flag in the main process;
* Lightning's own ``auto_requeue=True`` is refused;
* outside Slurm a signal saves ``hpc_ckpt_N`` at the step boundary, removes older ones, stops, requeues nothing;
  with ``SLURM_JOB_ID`` (or an array job) and a fake ``scontrol`` the job is requeued exactly once;
* ``experiments/slurm/slurm.yaml`` stacked on base.yaml keeps ModelCheckpoint, adds SafeRequeue + the plugin.

With Slurm (marker ``slurm``; skipped when not root, when Slurm is missing and cannot be installed, or when
``tests/slurm/slurm-up.sh`` fails): the co-evolution experiment + slurm.yaml as a batch job that ``exec``s python.
SIGUSR1 comes from ``scancel --batch`` while the first run holds at the end of step 3 (``PauseUntilSignal``). The job
saves
hpc_ckpt_1 at step 4, requeues itself, runs again (``Restarts=1``, ``SLURM_RESTART_COUNT=1``), restores hpc_ckpt_1
by itself (``ckpt_path`` unset) and completes. Every step is trained once, and the per-step losses equal those of
the same command run uninterrupted outside Slurm (compared exactly: fp32 on CPU, one thread in both).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.environments import SLURMEnvironment

from callbacks import SafeRequeue, read_step_log
from callbacks import requeue as requeue_mod
from tests.conftest import REPO

SLURM_SCRIPTS = REPO / "tests" / "slurm"
EXPERIMENTS = REPO / "experiments"
STACK = ["base.yaml", "gduf.yaml", "coevolve.yaml", "slurm/slurm.yaml"]
MAX_STEPS = 12
# the first run holds at the end of this step until SIGUSR1 arrives, so the preemption checkpoint is always taken at
# the end of the next step (4): after the first fresh fakes (every 3 steps) and the first teacher refresh (every 4)
PAUSE_AT = 3


@pytest.fixture
def no_slurm_env(monkeypatch):
    """As outside any Slurm job (pytest itself may run inside one)."""
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)


#####################################################################################################
# Without Slurm
#####################################################################################################


def test_signal_names_and_job_ids(no_slurm_env, monkeypatch):
    from callbacks.requeue import parse_signal, slurm_job_id

    assert parse_signal("SIGUSR1") == parse_signal("usr1") == parse_signal(10) == signal.SIGUSR1
    assert parse_signal("USR2") == signal.SIGUSR2
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert slurm_job_id() == "4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "7_3"


def fake_scontrol(tmp_path: Path, monkeypatch, rc: int = 0) -> Path:
    """A ``scontrol`` on PATH that appends its arguments to a file and exits ``rc``; returns that file."""
    calls = tmp_path / "scontrol_calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                      f'[ {rc} = 0 ] || echo "scontrol_error: Requested operation is presently disabled" >&2\n'
                      f"exit {rc}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_failing_or_missing_scontrol_raises(tmp_path, monkeypatch):
    from callbacks.requeue import requeue

    calls = fake_scontrol(tmp_path, monkeypatch, rc=1)
    with pytest.raises(RuntimeError, match="exit code 1: .*presently disabled"):
        requeue("17")
    assert calls.read_text() == "requeue 17\n"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="scontrol is not on PATH"):
        requeue("17")


def test_handler_sets_the_flag_only_in_the_main_process():
    cb = SafeRequeue()
    cb._pid = os.getpid()
    previous = signal.signal(signal.SIGUSR1, cb._handle)
    try:
        pid = os.fork()
        if pid == 0:  # the child, like a forked DataLoader worker: the inherited handler must do nothing
            os.kill(os.getpid(), signal.SIGUSR1)
            os._exit(1 if cb.received else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not cb.received
        os.kill(os.getpid(), signal.SIGUSR1)
        assert cb.received
    finally:
        signal.signal(signal.SIGUSR1, previous)


class SignalAt(Callback):
    """Sends ``sig`` to this process at the end of batch ``batch_idx`` (before SafeRequeue's hook runs)."""

    def __init__(self, batch_idx: int, sig: int = signal.SIGUSR1) -> None:
        self.batch_idx, self.sig = batch_idx, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), self.sig)


def boring_fit(root: Path, *callbacks, plugins=None, max_steps: int = 10) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=list(callbacks), plugins=plugins)
    trainer.fit(BoringModel())
    return trainer


def test_lightning_auto_requeue_is_refused(tmp_path, no_slurm_env):
    with pytest.raises(ValueError, match="auto_requeue=False"):
        boring_fit(tmp_path, SafeRequeue(), plugins=[SLURMEnvironment(auto_requeue=True)])


def test_outside_slurm_saves_removes_older_and_stops(tmp_path, no_slurm_env, monkeypatch, caplog):
    monkeypatch.setattr(requeue_mod.log, "propagate", True)  # into caplog
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"an older one")
    calls = fake_scontrol(tmp_path, monkeypatch)
    before = signal.getsignal(signal.SIGUSR1)
    with caplog.at_level(logging.INFO, logger="unigendet.requeue"):
        trainer = boring_fit(tmp_path, SignalAt(2), SafeRequeue())
    assert trainer.global_step == 3  # stopped at the boundary of the batch that got the signal
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_2.ckpt"]
    assert torch.load(tmp_path / "hpc_ckpt_2.ckpt", weights_only=False)["global_step"] == 3
    assert not calls.exists()  # no SLURM_JOB_ID: nothing requeued
    assert "not under Slurm" in caplog.text and "removed the older" in caplog.text
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored at teardown


@pytest.mark.parametrize("env, job", [({"SLURM_JOB_ID": "4242"}, "4242"),
                                      ({"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242",
                                        "SLURM_ARRAY_TASK_ID": "8"}, "4242_8")])
def test_requeues_the_job_once(tmp_path, no_slurm_env, monkeypatch, env, job):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = fake_scontrol(tmp_path, monkeypatch)
    trainer = boring_fit(tmp_path, SignalAt(1), SafeRequeue())
    assert trainer.global_step == 2
    assert calls.read_text() == f"requeue {job}\n"
    assert (tmp_path / "hpc_ckpt_1.ckpt").exists()


def test_failing_requeue_fails_the_fit(tmp_path, no_slurm_env, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    fake_scontrol(tmp_path, monkeypatch, rc=1)
    with pytest.raises(RuntimeError, match="scontrol requeue 4242` failed"):
        boring_fit(tmp_path, SignalAt(1), SafeRequeue())


def test_slurm_yaml_keeps_model_checkpoint_and_adds_safe_requeue(capsys):
    from unigendet.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={EXPERIMENTS / 'base.yaml'}", f"--config={EXPERIMENTS / 'slurm/slurm.yaml'}",
              "--print_config"])
    assert exit_info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)["trainer"]
    base = [c["class_path"] for c in yaml.safe_load((EXPERIMENTS / "base.yaml").read_text())["trainer"]["callbacks"]]
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in base
    assert [c["class_path"] for c in cfg["callbacks"]] == [*base, "callbacks.SafeRequeue"]
    [plugin] = cfg["plugins"]
    assert plugin["class_path"].endswith("SLURMEnvironment") and plugin["init_args"]["auto_requeue"] is False


#####################################################################################################
# A real Slurm
#####################################################################################################


class PauseUntilSignal(Callback):
    """Test helper (used by the job through its class_path): in the FIRST run of a Slurm job, holds training at the
    end of ``step`` until SafeRequeue got its signal, so that the preemption lands at a fixed step (``step + 1``).
    Does nothing outside Slurm (the reference run) and in requeued runs. Writes ``<default_root_dir>/paused``."""

    def __init__(self, step: int, timeout: float = 180.0) -> None:
        self.step, self.timeout = step, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.global_step != self.step or "SLURM_JOB_ID" not in os.environ
                or os.environ.get("SLURM_RESTART_COUNT")):
            return
        [requeue] = [c for c in trainer.callbacks if isinstance(c, SafeRequeue)]
        (Path(trainer.default_root_dir) / "paused").write_text(str(self.step))
        deadline = time.monotonic() + self.timeout
        while not requeue.received:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PauseUntilSignal: no {requeue.signal.name} within {self.timeout} s")
            time.sleep(0.1)


def start_slurm(cpus: int | None = None, gpus: int = 0) -> None:
    """Start (or reconfigure) the one-node Slurm of tests/slurm/slurm-up.sh; skip the calling test when that cannot
    work here.
    ``cpus`` / ``gpus``: what the node declares (more than it has, so that GPU-node job scripts are accepted; the GPUs
    are count-only, without devices)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: tests/slurm/slurm-up.sh installs Slurm and starts munged, slurmctld and slurmd")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "SLURM_GPUS": str(gpus), **({"SLURM_CPUS": str(cpus)} if cpus else {})}
    up = subprocess.run(["bash", str(SLURM_SCRIPTS / "slurm-up.sh")], capture_output=True, text=True, timeout=900,
                        stdin=subprocess.DEVNULL, env=env)
    if up.returncode != 0:
        pytest.skip(f"tests/slurm/slurm-up.sh could not start Slurm (rc {up.returncode}):\n"
                    f"{(up.stdout + up.stderr)[-3000:]}")


def wait_for_job(job: str, logs: Path, timeout: float) -> tuple[dict[str, str], str]:
    """Wait until the job ends; its final `scontrol show job` state and its output file (``logs/*-<job>.out``)."""
    deadline = time.monotonic() + timeout
    while (state := job_state(job))["JobState"] not in TERMINAL:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", "--full", job], check=False)
            break
        time.sleep(2)
    out = sorted(logs.glob(f"*-{job}.out"))
    return state, out[0].read_text() if out else "(no output file)"


@pytest.fixture(scope="module")
def slurm_cluster():
    start_slurm()
    try:
        yield
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "slurm-down.sh"), "--clean"], check=True, capture_output=True,
                       timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from unigendet.demo.corpus import SMALL, build_demo_corpus

    out = tmp_path_factory.mktemp("slurm_corpus")
    build_demo_corpus(out, seed=0, n_real=SMALL["n_real"], n_fake_per_family=SMALL["n_fake_per_family"])
    return out


def fit_args(corpus: Path, root: Path) -> list[str]:
    """The co-evolution experiment + slurm.yaml at test size (as test_lit_module's CLI test); base.yaml's StepLog."""
    small = {"mot": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_dim": 128},
             "vit": {"dim": 32, "n_layers": 1, "n_heads": 2, "mlp_dim": 64}, "head": {"diga_layer": 1}}
    return [*(f"--config={EXPERIMENTS / c}" for c in STACK),
            "--model.model_name=demo", f"--model.model_overrides={json.dumps(small)}", "--model.init_from=null",
            f"--trainer.max_steps={MAX_STEPS}", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",  # base.yaml's StepLog writes <root>/steps.jsonl
            "--trainer.callbacks+=" + json.dumps({"class_path": "tests.test_slurm.PauseUntilSignal",
                                                  "init_args": {"step": PAUSE_AT}}),
            f"--data.train={corpus / 'detection/train.json'}", f"--data.val={corpus / 'detection/val.json'}",
            f"--data.tokenizer={corpus / 'tokenizer.json'}", "--data.image_root=null", "--data.num_workers=0",
            "--data.token_budget=900", "--data.packs_per_epoch=4", f"--data.gen.train={corpus / 't2i/train.jsonl'}",
            "--data.gen.token_budget=400", "--data.gen.image_column=image", "--data.gen.caption_column=caption",
            "--model.stage.diga_layer=1",
            # fresh fakes and a teacher refresh on both sides of the preemption
            "--model.stage.fresh_fake_px=32", "--model.stage.fresh_fake_steps=2",
            "--model.stage.fresh_fakes_every=3", "--model.stage.teacher_refresh=4"]


def job_env() -> dict[str, str]:
    """The test's environment without Slurm's variables, one torch thread in the job and the reference alike."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    path = [str(REPO), *filter(None, [env.get("PYTHONPATH")])]  # tests.test_slurm.PauseUntilSignal
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(path))
    return env


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


@dataclass
class Preempted:
    job: str
    root: Path  # the job's default_root_dir
    log: str  # the job's output file (both runs)
    state: dict[str, str]  # `scontrol show job` at the end
    ref_root: Path  # the uninterrupted run's default_root_dir
    ref_log: str
    ref_rc: int
    seconds: float


@pytest.fixture(scope="module")
def preempted(slurm_cluster, corpus, tmp_path_factory) -> Preempted:
    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("slurm_job")
    root, ref_root, out = tmp / "root", tmp / "reference", tmp / "job.out"
    cmd = [sys.executable, "-m", "unigendet", "fit"]
    script = tmp / "job.sh"
    script.write_text("#!/bin/bash\n"
                      'echo "unigendet-test: run restart=${SLURM_RESTART_COUNT-unset} ntasks=${SLURM_NTASKS-unset}"\n'
                      "export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1\n"
                      # exec: python IS the batch shell, so `scancel --batch` signals it
                      f"exec {shlex.join(cmd + fit_args(corpus, root))}\n")
    # --ntasks-per-node: SLURM_NTASKS is what makes Lightning detect Slurm (and resume from hpc_ckpt_N)
    sbatch = ["sbatch", "--parsable", "--job-name=unigendet-slurm-test", "--requeue", "--open-mode=append",
              "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=15", f"--output={out}",
              f"--chdir={tmp}", str(script)]
    job = subprocess.run(sbatch, capture_output=True, text=True, check=True, env=job_env()).stdout.strip()
    job = job.split(";")[0]
    ref_log = tmp / "reference.out"
    with ref_log.open("w") as f:  # the same command, outside Slurm, never signalled; runs alongside the job
        ref = subprocess.Popen(cmd + fit_args(corpus, ref_root), stdout=f, stderr=subprocess.STDOUT, cwd=tmp,
                               env=job_env(), stdin=subprocess.DEVNULL)

    def fail(msg: str):
        subprocess.run(["scancel", "--full", job], check=False)
        ref.kill()
        ref.wait()
        pytest.fail(f"{msg}\n--- job output ---\n{out.read_text()[-6000:] if out.exists() else '(none)'}")

    try:
        deadline = time.monotonic() + 300
        while not (root / "paused").exists():
            state = job_state(job)["JobState"]
            if state in TERMINAL or time.monotonic() > deadline:
                fail(f"job {job} is {state} and has not reached step {PAUSE_AT}")
            time.sleep(0.5)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        deadline = time.monotonic() + 420
        while (state := job_state(job))["JobState"] not in TERMINAL:
            if time.monotonic() > deadline:
                fail(f"job {job} still {state['JobState']} (Restarts={state.get('Restarts')}) after 420 s")
            time.sleep(1)
        ref_rc = ref.wait(timeout=600)
    except BaseException:
        ref.kill()
        ref.wait()
        raise
    return Preempted(job=job, root=root, log=out.read_text(), state=state, ref_root=ref_root,
                     ref_log=ref_log.read_text(), ref_rc=ref_rc, seconds=time.monotonic() - t0)


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes(preempted):
    p, ckpt = preempted, preempted.root / "hpc_ckpt_1.ckpt"
    print(f"slurm job {p.job}: signal -> requeue -> resume -> COMPLETED in {p.seconds:.0f} s (with the reference)")
    assert p.state["JobState"] == "COMPLETED", p.log[-6000:]
    assert p.state["Restarts"] == "1", p.log[-6000:]
    assert p.state["ExitCode"] == "0:0", p.log[-6000:]
    runs = re.findall(r"^unigendet-test: run (.*)$", p.log, flags=re.M)
    assert runs == ["restart=unset ntasks=1", "restart=1 ntasks=1"], p.log[-6000:]
    # run 1: the signal became a checkpoint and a requeue; run 2: Lightning restored it with ckpt_path unset
    assert sorted(x.name for x in p.root.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]
    saved_at = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert saved_at == PAUSE_AT + 1  # the signal arrived during the pause: saved at the end of the next step
    assert f"SafeRequeue [rank 0]: saved {ckpt} at global_step={saved_at}" in p.log
    assert f"SafeRequeue: requeued Slurm job {p.job}" in p.log
    assert f"Restoring states from the checkpoint path at {ckpt}" in p.log
    assert f"Restored all states from the checkpoint at {ckpt}" in p.log
    assert p.log.count("SIGUSR1 handler installed") == 2
    # every step trained exactly once: run 1 wrote 1..saved_at, run 2 saved_at+1..MAX_STEPS
    logged = [json.loads(line)["step"] for line in (p.root / "steps.jsonl").read_text().splitlines()]
    assert logged == list(range(1, MAX_STEPS + 1))
    assert "Traceback" not in p.log


def step_differences(ref: dict[int, dict[str, float]], got: dict[int, dict[str, float]],
                     resumed_after: int) -> list[str]:
    """Every (step, key) whose value differs, exactly. A key missing from the resumed run is not a difference only
    where the reference merely carries it over from before the resume: StepLog writes the last logged value of
    metrics not logged at every step (``train/loss_fresh`` every J steps), and a resumed run starts without them."""
    diffs = []
    for step in sorted(set(ref) | set(got)):
        if step not in ref or step not in got:
            diffs.append(f"step {step}: only in {'reference' if step in ref else 'resumed run'}")
            continue
        for key in sorted(set(ref[step]) | set(got[step])):
            a, b = ref[step].get(key), got[step].get(key)
            if b is None and a is not None and step > resumed_after and all(
                    key not in got[s] and ref[s].get(key) == ref[resumed_after].get(key)
                    for s in range(resumed_after + 1, step + 1)):
                continue  # a stale carry-over in the reference, not a value of this step
            if a != b:
                diffs.append(f"step {step} {key}: uninterrupted {a!r} != preempted {b!r}")
    return diffs


@pytest.mark.slurm
def test_preempted_losses_equal_uninterrupted_run(preempted):
    p = preempted
    assert p.ref_rc == 0, p.ref_log[-6000:]
    ref, got = read_step_log(p.ref_root / "steps.jsonl"), read_step_log(p.root / "steps.jsonl")
    resumed_after = torch.load(p.root / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert sorted(ref) == sorted(got) == list(range(1, MAX_STEPS + 1))
    diffs = step_differences(ref, got, resumed_after)
    assert not diffs, f"resumed after step {resumed_after}; {len(diffs)} differences:\n" + "\n".join(diffs)
