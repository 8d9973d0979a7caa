"""A run resumed on another number of processes continues its data pass: 2 -> 1 and 1 -> 2 CPU processes (gloo,
FSDP2), with 0 and 2 loader workers, through ``unigendet fit`` and its checkpoints. The multiset of samples trained
in the first record epoch, before and after the change (``callbacks.SampleLog``), equals that of one uninterrupted
pass: nothing trained twice, nothing left out, on both streams of the GDUF stage."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from callbacks import read_sample_log
from tests.test_resume import EXPERIMENTS, SMALL, corpus, run, trainer_config  # noqa: F401 (corpus: a fixture)

pytestmark = pytest.mark.multiprocess
N_RECORDS = 20  # per stream: a pass is a few steps


@pytest.fixture(scope="module")
def small(corpus):  # noqa: F811
    """The first records of the demo corpus's detection and text-to-image training splits, beside them."""
    det = json.loads((corpus / "detection" / "train.json").read_text())[:N_RECORDS]
    (corpus / "detection" / "small.json").write_text(json.dumps(det))
    lines = (corpus / "t2i" / "train.jsonl").read_text().splitlines()[:N_RECORDS]
    (corpus / "t2i" / "small.jsonl").write_text("\n".join(lines) + "\n")
    return corpus


def fit(data: Path, root: Path, *extra: str, devices: int, workers: int, steps: int) -> list[str]:
    """``unigendet fit`` of the GDUF stage on a test-sized model, sharded over ``devices`` CPU processes (each
    rank reads its own shard of both streams), a checkpoint every step, every rank's trained samples logged."""
    trainer_cfg = trainer_config(root, {"class_path": "callbacks.SampleLog",
                                        "init_args": {"folder": str(root / "samples")}})
    return [sys.executable, "-m", "unigendet", "fit",
            *[f"--config={EXPERIMENTS / c}" for c in ("base.yaml", "gduf.yaml")], f"--config={trainer_cfg}",
            "--model.model_name=demo", f"--model.model_overrides={SMALL}", "--model.init_from=null",
            "--trainer.strategy=fsdp2", "--model.fsdp.param_dtype=fp32",
            f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
            "--trainer.logger=false", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
            f"--data.train={data / 'detection' / 'small.json'}", "--data.val=null",
            f"--data.tokenizer={data / 'tokenizer.json'}", "--data.image_root=null", f"--data.num_workers={workers}",
            "--data.token_budget=900", "--data.packs_per_epoch=4",
            f"--data.gen.train={data / 't2i' / 'small.jsonl'}", "--data.gen.val=null", "--data.gen.token_budget=400",
            *extra]


def first_pass(root: Path) -> Counter:
    """(stream, sample id) of every sample trained in record epoch 0, counted."""
    return Counter((name, sid) for samples in read_sample_log(root / "samples").values()
                   for name, epoch, sid in samples if epoch == 0)


@pytest.fixture(scope="module")
def uninterrupted(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    run(fit(small, root, devices=1, workers=0, steps=STEPS), root / "run.log")
    return first_pass(root)


STEPS = 10  # record epoch 0 of both streams ends by step 7 on one process


@pytest.mark.parametrize(("before", "after", "workers"), [
    (2, 1, 2), (1, 2, 0),
    pytest.param(2, 1, 0, marks=pytest.mark.slow), pytest.param(1, 2, 2, marks=pytest.mark.slow)])
def test_a_resumed_pass_on_another_number_of_processes_trains_each_sample_once(small, uninterrupted, tmp_path,
                                                                                before, after, workers):
    root = tmp_path / "run"
    run(fit(small, root, devices=before, workers=workers, steps=3), tmp_path / "before.log")
    proc = run(fit(small, root, f"--ckpt_path={root / 'ckpt' / 'last.ckpt'}", devices=after, workers=workers,
                   steps=STEPS), tmp_path / "after.log")
    assert f"written by {before} processes, resumed by {after}" in proc.stdout + proc.stderr
    resumed = first_pass(root)
    assert resumed == uninterrupted
    assert set(uninterrupted.values()) == {1}  # one pass: each sample once
    assert {name for name, _ in uninterrupted} == {"det", "gen"} and len(uninterrupted) == 2 * N_RECORDS
