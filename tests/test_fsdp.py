"""FSDP2 for real: 2 CPU processes (gloo) run the co-evolution loop sharded, equal a single process step for step,
checkpoint (distributed, sharded, sealed with SHA256SUMS), are killed three times (once mid-save), resume exactly,
and resume on another number of processes."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from callbacks import read_step_log
from tests.test_resume import (  # noqa: F401 (corpus is a fixture)
    STEPS,
    assert_retention,
    corpus,
    differing,
    fit_command,
    preempt_three_times,
    run,
    run_and_kill,
)

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
    # sealed: every file of the folder listed in SHA256SUMS, which sha256sum itself accepts
    sums = (last / "SHA256SUMS").read_text()
    assert all(p.name in sums for p in last.iterdir() if p.name != "SHA256SUMS")
    check = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=last, capture_output=True,
                           text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 4, check.stdout + check.stderr
    ranks = torch.load(last / "meta.pt", weights_only=True)["unigendet"]["ranks"]
    assert torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])  # rank_seeds=false: one shared stream

    # consolidation for export/inference: our one-tensor-at-a-time reader equals torch's own converter, EMA first
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from unigendet.checkpoint.loading import load_lightning_checkpoint

    model, report, tokenizer = load_lightning_checkpoint(last)
    dcp_to_torch_save(last, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)["state_dict"]
    for name, p in model.named_parameters():
        ema_key = "ema." + name.replace(".", "__")
        assert torch.equal(p, full[ema_key] if ema_key in full else full["model." + name]), name
    assert tokenizer and len(report.loaded) == len(list(model.parameters()))
    damaged = tmp_path / "damaged.ckpt"  # one flipped byte in rank 1's shard: refused, naming the shard
    shutil.copytree(last, damaged)
    shard = damaged / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    from unigendet.checkpoint.folders import CheckpointError

    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: damaged"):
        load_lightning_checkpoint(damaged)

    # and `unigendet export` turns the sharded checkpoint into a BAGEL-format folder with its tokenizer
    from unigendet.checkpoint.loading import load_model
    from unigendet.cli import main

    assert main(["export", "--ckpt", str(last), "--out", str(tmp_path / "export")]) == 0
    exported, _ = load_model(tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer.json").read_text() == tokenizer
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in exported.named_parameters())


@pytest.mark.slow  # 2 minutes; the default suite has the same three preemptions on one process (test_resume.py)
def test_sharded_run_preempted_three_times_repeats_the_single_process(corpus, single, tmp_path):  # noqa: F811
    root = tmp_path / "fsdp"
    kills = preempt_three_times(lambda *extra: fit_command(corpus, root, *extra, devices=2, workers=0), root,
                                tmp_path)
    resumed = read_step_log(root / "steps.jsonl")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    diffs = differing(single, resumed, REL)
    assert not diffs, f"{kills}: {diffs}"
    assert_retention(root / "ckpt")


@pytest.mark.slow  # the default suite resumes 2 -> 1 and 1 -> 2 processes in tests/test_reshard_resume.py
def test_a_two_process_checkpoint_resumes_on_one_process(corpus, tmp_path):  # noqa: F811
    """Weights, EMA, teacher and optimiser states reshard on load (co-evolution stage, replicated data); RNG states
    cannot be mapped onto another number of processes: the run says so and continues the step count."""
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


@pytest.mark.slow  # the same fallback on one process is in the default suite (tests/test_integrity.py)
def test_two_processes_resuming_from_a_damaged_last_fall_back_to_the_newest_intact(corpus, tmp_path):  # noqa: F811
    """Each rank verifies half of the shards; rank 0's finding stops both ranks' use of the damaged checkpoint."""
    root = tmp_path / "fsdp"
    run(fit_command(corpus, root, "--trainer.max_steps=3", devices=2, workers=0), tmp_path / "first.log")
    ckpt = root / "ckpt"
    shard = ckpt / "last.ckpt" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run(fit_command(corpus, root, "--ckpt_path=last", "--trainer.max_steps=5", devices=2, workers=0),
               tmp_path / "resumed.log")
    out = proc.stdout + proc.stderr
    assert f"{shard}: damaged" in out
    assert f"resuming from the newest intact checkpoint instead: {ckpt / 'epoch=0-step=3.ckpt'}" in out
    assert f"Restored all states from the checkpoint at {ckpt / 'epoch=0-step=3.ckpt'}" in out
    assert torch.load(ckpt / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 5
    # save_top_k=1 keeps the newest step, and Lightning keeps the checkpoint a run resumed from
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch=0-step=3.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]


@pytest.fixture(scope="module")
def init_folder(tmp_path_factory):
    """A UniGenDet folder (several weight shards + ae.safetensors) of the test-sized model, other seed."""
    from tests.test_resume import SMALL
    from unigendet.checkpoint.folders import save_folder
    from unigendet.model.config import UniGenDetConfig
    from unigendet.model.unigendet import UniGenDet

    torch.manual_seed(123)
    model = UniGenDet(UniGenDetConfig.from_name("demo", **SMALL))
    model.init_weights()
    out = tmp_path_factory.mktemp("init_folder")
    save_folder(model, out, max_shard_bytes=300_000)
    assert len(list(out.glob("*.safetensors"))) > 3
    return out


def test_sharded_initialisation_from_a_folder_loads_shard_by_shard(corpus, single, init_folder, tmp_path):  # noqa: F811
    """Under FSDP2 with ``init_from``, each rank builds on the meta device, allocates its shards and streams the
    folder in one tensor at a time: the run equals a single process that loaded the folder whole."""
    args = (f"--model.init_from={init_folder}", "--trainer.max_steps=3")
    run(fit_command(corpus, tmp_path / "one", *args, workers=0), tmp_path / "one.log")
    run(fit_command(corpus, tmp_path / "two", *args, devices=2, workers=0), tmp_path / "two.log")
    one, two = read_step_log(tmp_path / "one" / "steps.jsonl"), read_step_log(tmp_path / "two" / "steps.jsonl")
    assert sorted(two) == [1, 2, 3]
    assert not differing(one, two, REL)
    assert differing({1: single[1]}, {1: one[1]}, REL)  # the folder's weights, not the seed's: other losses


def test_ranks_draw_independent_noise_by_default(corpus, tmp_path):  # noqa: F811
    """``rank_seeds`` (the default): rank r's stream starts from seed + r, so the RNG states the checkpoint keeps
    per rank differ (with ``rank_seeds=false``, as in the equivalence runs above, they are equal)."""
    root = tmp_path / "fsdp"
    run(fit_command(corpus, root, "--model.rank_seeds=true", "--trainer.max_steps=2", devices=2, workers=0),
        tmp_path / "fsdp.log")
    ranks = torch.load(root / "ckpt" / "last.ckpt" / "meta.pt", weights_only=True)["unigendet"]["ranks"]
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])
