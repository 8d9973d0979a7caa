"""FSDP2 for real: 2 CPU processes (gloo) run the co-evolution loop sharded, equal a single process step for step,
checkpoint (distributed, sharded), are killed, resume exactly, and resume on another number of processes."""

from __future__ import annotations

import random

import pytest
import torch

from callbacks import read_step_log
from tests.test_resume import STEPS, corpus, differing, fit_command, run, run_and_kill  # noqa: F401 (fixture)

pytestmark = pytest.mark.multiprocess

REL = 1e-5  # fp32; the sharded run reduces the gradient norm over shards (another summation order)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("single")
    run(fit_command(corpus, root, workers=0), root / "run.log")
    return read_step_log(root / "steps.jsonl")


def test_two_sharded_processes_repeat_a_single_process_and_shard_the_checkpoint(corpus, single, tmp_path):  # noqa: F811
    root = tmp_path / "fsdp"
    proc = run(fit_command(corpus, root, devices=2, workers=0), tmp_path / "fsdp.log")
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    sharded = read_step_log(root / "steps.jsonl")
    assert sorted(sharded) == list(range(1, STEPS + 1))
    assert not differing(single, sharded, REL)

    last = root / "ckpt" / "last.ckpt"
    shards = sorted(last.glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"] and (last / "meta.pt").is_file()
    sizes = [p.stat().st_size for p in shards]
    # sharded weights, EMA, teacher and Adam states: each rank holds about half (replicated tensors would all be
    # written by rank 0 alone)
    assert 0.7 < sizes[0] / sizes[1] < 1.4, sizes
    assert not list(last.parent.glob(".*.partial")) and not list(last.parent.glob(".*.old"))


def test_sharded_run_killed_then_resumed_repeats_the_single_process(corpus, single, tmp_path):  # noqa: F811
    root = tmp_path / "fsdp"
    kill_after = random.Random().randint(2, STEPS - 2)
    done = run_and_kill(fit_command(corpus, root, devices=2, workers=0), root / "steps.jsonl", kill_after,
                        tmp_path / "killed.log")
    run(fit_command(corpus, root, "--ckpt_path=last", devices=2, workers=0), tmp_path / "resumed.log")
    resumed = read_step_log(root / "steps.jsonl")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    diffs = differing(single, resumed, REL)
    assert not diffs, f"killed after {kill_after} steps (logged {done}): {diffs}"


def test_a_two_process_checkpoint_resumes_on_one_process(corpus, tmp_path):  # noqa: F811
    """Weights, EMA, teacher and optimiser states reshard on load; RNG and data positions cannot be mapped onto
    another number of processes: the run says so and continues the step count."""
    root = tmp_path / "fsdp"
    run_and_kill(fit_command(corpus, root, devices=2, workers=0), root / "steps.jsonl", 3, tmp_path / "killed.log")
    ckpt = root / "ckpt" / "last.ckpt"
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    saved_step = meta["global_step"]
    assert len(meta["unigendet"]["ranks"]) == 2
    proc = run(fit_command(corpus, root, f"--ckpt_path={ckpt}", "--trainer.strategy=fsdp2",
                           "--model.fsdp.param_dtype=fp32", devices=1, workers=0), tmp_path / "resumed.log")
    assert "written by 2 processes, resumed by 1" in proc.stdout + proc.stderr
    steps = read_step_log(root / "steps.jsonl")
    assert sorted(steps) == list(range(1, STEPS + 1))  # steps after saved_step were trained by the 1-process run
    assert saved_step >= 2
