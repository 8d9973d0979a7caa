"""Issue 9: the bad-input corpus (``tests/bad_inputs.py``) through the real DataModule loaders and ``unigendet detect``.

0 crashes; every good record delivered (by id, counted); every bad one skipped and counted under its reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from data_modules.detection import DetectionDataModule
from data_modules.t2i import T2IDataModule
from tests.bad_inputs import DELIVER, build_bad_corpus
from tests.conftest import REPO
from unigendet.checkpoint.folders import save_folder
from unigendet.inputs.tokenizer import train_bpe
from unigendet.model.config import UniGenDetConfig
from unigendet.model.unigendet import UniGenDet

SIZES = dict(vit_min_side=28, vit_max_side=56, vae_min_side=32, vae_max_side=64)
BUDGET = 400  # tokens per pack: a good detection sample is ~60, the long answer is several hundred more


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    m = build_bad_corpus(tmp_path_factory.mktemp("bad_corpus"))
    cfg = UniGenDetConfig.from_name("tiny")
    train_bpe(m.texts * 4, m.root / "tokenizer.json", vocab_size=cfg.mot.vocab_size, min_frequency=1)
    return m, cfg


def test_the_corpus_covers_the_issue(corpus):
    m, _ = corpus
    kinds = m.kinds()
    assert len(kinds) >= 25
    for kind in ["truncated_jpeg", "truncated_png", "zero_bytes", "not_an_image", "cmyk", "grey16",
                 "palette_transparency", "la", "exif_rotation", "animated_gif", "animated_webp", "bomb", "pixel_1x1",
                 "wide_20000x10", "missing_file", "dotdot_escape", "absolute_path", "symlink_out",
                 "malformed_json_line", "json_list_truncated", "label_2", "label_string_fake", "label_null",
                 "missing_conversations", "gpt_turn_first", "no_image_tag", "non_utf8_text", "answer_1mb",
                 "caption_1mb", "null_image_cell", "nul_bytes_image_cell", "caption_with_nul"]:
        assert kind in kinds, kind
    for name, entries in m.corpora.items():
        assert len({e.id for e in entries}) == len(entries), name
        assert len(m.delivered(name)) >= 6 and sum(m.skips(name).values()) >= 10, name


def _one_pass(dm) -> tuple[list[str], dict[str, int]]:
    """Sample ids of one validation pass (order kept) and the corpus-wide skip counts after it."""
    ids, metrics = [], {}
    for batch in dm.val_dataloader():
        ids += batch.sample_ids
        metrics = dm.skip_metrics(batch)
    return ids, {k.removeprefix("data/skipped/"): v for k, v in metrics.items()}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("corpus_file", ["det_jsonl", "det_json", "t2i_jsonl", "t2i_parquet"])
def test_datamodule_delivers_every_good_record_and_counts_every_skip(corpus, corpus_file, workers):
    m, cfg = corpus
    path = getattr(m, corpus_file)
    common = dict(val=str(path), tokenizer=str(m.root / "tokenizer.json"), token_budget=BUDGET, num_workers=workers,
                  **SIZES)
    if corpus_file.startswith("det"):
        dm = DetectionDataModule(**common)
    else:
        dm = T2IDataModule(**common, caption_dropout=0.0)
    dm.connect(cfg)
    ids, skipped = _one_pass(dm)
    expected = m.delivered(path.name)
    assert len(ids) == len(set(ids)), "a record was delivered twice"
    assert sorted(ids) == sorted(expected), (set(ids) ^ set(expected))
    assert len(ids) == len(expected)
    assert Counter(skipped) == m.skips(path.name)
    # read-time and decode-time skips partition the records: nothing is counted twice or lost
    assert len(ids) + sum(skipped.values()) == len(m.corpora[path.name])


def _tiny_model_folder(path, tokenizer):
    cfg = UniGenDetConfig.from_name("tiny")
    torch.manual_seed(0)
    model = UniGenDet(cfg)
    model.init_weights()
    save_folder(model, path)
    (path / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return path


def test_detect_cli_reports_one_line_per_file(corpus, tmp_path):
    m, _ = corpus
    ckpt = _tiny_model_folder(tmp_path / "ckpt", m.root / "tokenizer.json")
    missing = [p for p, expect in m.detect.items() if expect == "missing_file" and not os.path.lexists(p)]  # named
    proc = subprocess.run([sys.executable, "-m", "unigendet", "detect", str(m.images), *missing, "--ckpt", str(ckpt),
                           "--no-explain", "--batch-size", "8", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    reported = {r["path"]: r for r in rows}
    assert len(reported) == len(rows), "a file was reported twice"
    expected = {p: e for p, e in m.detect.items() if e is not None}
    assert set(reported) == set(expected)
    assert len(rows) == len(expected)
    for path, expect in expected.items():
        row = reported[path]
        if expect == DELIVER:
            assert "error" not in row and 0.0 <= row["p_fake"] <= 1.0 and row["label"] in ("fake", "real"), row
        else:
            assert row == {"path": path, "error": expect}, row
    n_good = sum(e == DELIVER for e in expected.values())
    assert n_good >= 15 and sum("p_fake" in r for r in rows) == n_good


def test_skips_of_a_worker_without_a_good_record_are_counted(corpus, tmp_path):
    m, cfg = corpus
    good = {"image": "images/good_0.png", "label": 0,
            "conversations": [{"from": "human", "value": "<image>Real?"}, {"from": "gpt", "value": "This is a fake."}]}
    path = m.images.parent / "worker_shards.jsonl"  # worker 0 reads records 0 and 2, worker 1 records 1 and 3
    path.write_text("\n".join(json.dumps(r) for r in [good, dict(good, image="images/missing.png")] * 2))
    dm = DetectionDataModule(val=str(path), tokenizer=str(m.root / "tokenizer.json"), token_budget=BUDGET,
                             num_workers=2, **SIZES).connect(cfg)
    ids, skipped = _one_pass(dm)
    assert len(ids) == 2
    assert skipped == {"missing_file": 2}

    # the token-less batch that carries the skip-only worker's counts goes through a real validation (no forward)
    import lightning as L

    from unigendet.training.module import LitUniGenDet

    lit = LitUniGenDet(model_name="tiny", ema_decay=None)
    tr = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    [metrics] = tr.validate(lit, datamodule=dm, verbose=False)
    assert 0.0 <= metrics["val/acc"] <= 1.0  # computed from the 2 good samples
    assert sum(len(p) for p in lit.validation.collected["p_fake"]) == 2
