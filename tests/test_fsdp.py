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

    # and `unigendet export` turns the sharded checkpoint into a BAGEL-format folder with its tokenizer
    from unigendet.checkpoint.loading import load_model
    from unigendet.cli import main

    assert main(["export", "--ckpt", str(last), "--out", str(tmp_path / "export")]) == 0
    exported, _ = load_model(tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer.json").read_text() == tokenizer
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in exported.named_parameters())


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
