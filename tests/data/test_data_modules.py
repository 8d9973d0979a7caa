"""The DataModules on small corpora built here: layouts, budgets, skips, Parquet == JSONL, and exact resume through a
real Lightning Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.coevolution import CoEvolutionDataModule
from data_modules.detection import DetectionDataModule
from data_modules.t2i import T2IDataModule
from unigendet.inputs.tokenizer import train_bpe
from unigendet.model.config import UniGenDetConfig

SIZES = dict(vit_min_side=28, vit_max_side=56, vae_min_side=32, vae_max_side=64)

#####################################################################################################
# A small corpus
#####################################################################################################


def _image(path: Path, seed: int, size=(48, 40)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "images").mkdir()
    det = []
    for i in range(24):
        _image(root / "images" / f"{i}.png", i, size=(32 + 8 * (i % 4), 40))
        label = int(i % 3 == 0)  # 8 real, 16 fake
        verdict = "This is a real image." if label else "This is a fake image."
        det.append({"image": f"images/{i}.png", "label": label, "cate": "animal" if i % 2 else "object",
                    "conversations": [{"from": "human", "value": "<image>Does the image looks real/fake?"},
                                      {"from": "gpt", "value": f"{verdict} Sample {i} has texture {i % 5}."}]})
    det.append({"image": "images/missing.png", "label": 0, "conversations": det[0]["conversations"]})
    det.append({"image": "images/1.png", "label": 2, "conversations": det[0]["conversations"]})
    (root / "det.json").write_text(json.dumps(det))
    t2i = [{"image_path": f"images/{i}.png", "prompt": f"a noisy picture number {i}"} for i in range(12)]
    (root / "t2i.jsonl").write_text("\n".join(json.dumps(r) for r in t2i))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"jpg": [(root / r["image_path"]).read_bytes() for r in t2i],
                      "TEXT": [r["prompt"] for r in t2i]})
    (root / "shards").mkdir()
    pq.write_table(table.slice(0, 7), root / "shards" / "a.parquet")
    pq.write_table(table.slice(7), root / "shards" / "b.parquet")
    texts = [c["value"] for r in det for c in r["conversations"]] + [r["prompt"] for r in t2i]
    train_bpe(texts, root / "tokenizer.json", vocab_size=300, min_frequency=1)
    cfg = UniGenDetConfig.from_name("tiny")  # its special tokens are 296..299, as train_bpe places them
    return root, cfg


def det_dm(root, cfg, **kw):
    args = dict(train=str(root / "det.json"), val=str(root / "det.json"), tokenizer=str(root / "tokenizer.json"),
                token_budget=400, num_workers=0, packs_per_epoch=4, **SIZES)
    args.update(kw)
    return DetectionDataModule(**args).connect(cfg)


#####################################################################################################
# Layout, budgets, skips
#####################################################################################################


def test_detection_batches_follow_the_method_layout(corpus):
    root, cfg = corpus
    dm = det_dm(root, cfg)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    for b in batches:
        assert b.seq_len <= 400
        assert b.det_labels.numel() == len(b.sample_lens) > 0
        # per sample: [clean VAE (full)] [ViT (full)] [prompt (causal)] [answer (causal, CE)]
        assert b.split_modes == ["full", "full", "causal", "causal"] * len(b.sample_lens)
        assert b.mse_indexes.numel() == 0 and torch.isinf(b.vae_timesteps).all()
        assert b.vae_images is not None and all(im.min() >= -1 and im.max() <= 1 for im in b.vae_images)
    # the answer's first token is the verdict, and the label matches it
    tok = dm.tok
    b = batches[0]
    for idx, label in zip(b.det_indexes.tolist(), b.det_labels.tolist(), strict=True):
        first = b.ce_labels[(b.ce_indexes == idx).nonzero()[0, 0]:][:12].tolist()
        text = tok.decode(first)
        assert text.startswith("This is a real" if label else "This is a fake"), text


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_records_are_counted_not_fatal(corpus, workers):
    root, cfg = corpus
    dm = det_dm(root, cfg, num_workers=workers, packs_per_epoch=8)
    batches = list(dm.train_dataloader())
    metrics = [dm.skip_metrics(b) for b in batches]
    assert dict(dm.read_skips.counts) == {"bad_label": 1}  # found while reading
    seen = {k for b in batches for k in b.stats["skipped"]}
    assert seen == {"missing_file"}  # found while decoding, inside the stream
    # corpus-wide totals across workers (the missing file is in one worker's shard, found once per record epoch)
    assert metrics[0]["data/skipped/bad_label"] == 1
    assert metrics[-1] == {"data/skipped/missing_file": metrics[-1]["data/skipped/missing_file"],
                           "data/skipped/bad_label": 1}
    assert metrics[-1]["data/skipped/missing_file"] >= 1


def test_without_smsa_drops_the_vae_split(corpus):
    root, cfg = corpus
    b = next(iter(det_dm(root, cfg, with_vae=False).train_dataloader()))
    assert b.split_modes == ["full", "causal", "causal"] * len(b.sample_lens) and b.vae_indexes.numel() == 0


def test_label_balancing_and_category_filter(corpus):
    root, cfg = corpus
    dm = det_dm(root, cfg, balance_labels=True)
    labels = [r.label for r in dm.split_records("train")]
    assert labels.count(0) == labels.count(1) == 17  # 16 fakes + the record whose file is missing (found at decode)
    dm = det_dm(root, cfg, categories=["animal"])
    assert {r.cate for r in dm.split_records("train")} == {"animal"}


def test_validation_is_one_pass_over_every_good_record(corpus):
    root, cfg = corpus
    ids = [i for b in det_dm(root, cfg).val_dataloader() for i in b.sample_ids]
    assert sorted(ids) == sorted(f"det.json:{i}" for i in range(24))


def test_parquet_and_jsonl_t2i_give_the_same_batches(corpus):
    root, cfg = corpus
    common = dict(tokenizer=str(root / "tokenizer.json"), token_budget=300, num_workers=0, packs_per_epoch=3,
                  caption_dropout=0.3, **SIZES)
    a = T2IDataModule(train=str(root / "t2i.jsonl"), **common).connect(cfg)
    b = T2IDataModule(train=str(root / "shards"), image_column="jpg", caption_column="TEXT", **common).connect(cfg)
    ba, bb = list(a.train_dataloader()), list(b.train_dataloader())
    assert len(ba) == len(bb) == 3
    n_dropped = 0
    for x, y in zip(ba, bb, strict=True):
        for field in ("text_ids", "position_ids", "vae_indexes", "vae_timesteps", "mse_indexes", "vae_grids"):
            assert torch.equal(getattr(x, field), getattr(y, field)), field
        assert all(torch.equal(i, j) for i, j in zip(x.vae_images, y.vae_images, strict=True))
        assert x.split_modes[-1] == "noise" and x.mse_indexes.numel() > 0
        n_dropped += x.split_modes.count("noise") - x.split_modes.count("causal")  # samples without a caption
    assert n_dropped > 0  # caption dropout removed some caption splits (p = 0.3)


def test_coevolution_yields_one_detection_and_one_generation_batch(corpus):
    root, cfg = corpus
    dm = CoEvolutionDataModule(train=str(root / "det.json"), tokenizer=str(root / "tokenizer.json"),
                               token_budget=400, num_workers=0, packs_per_epoch=3, **SIZES,
                               gen={"train": str(root / "t2i.jsonl"), "token_budget": 250, "teacher": True})
    dm.connect(cfg)
    steps = list(dm.train_dataloader())
    assert len(steps) == 3
    for step in steps:
        assert set(step) == {"det", "gen", "teacher"}
        assert step["det"].seq_len <= 400 and step["gen"].seq_len <= 250
        assert step["det"].det_labels.numel() > 0 and step["gen"].mse_indexes.numel() > 0
        # the teacher sees the same real images, detection-style: [clean VAE] [prompt] [ViT]
        assert step["teacher"].sample_ids == step["gen"].sample_ids
        assert step["teacher"].split_modes == ["full", "causal", "full"] * len(step["teacher"].sample_lens)


#####################################################################################################
# Exact resume through Lightning
#####################################################################################################


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []  # sample ids per step

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch.sample_ids))
        return (self.w * 0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(root, max_steps, callbacks=()):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=bool(callbacks),
                     callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=root)


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_run_sees_exactly_the_same_samples(corpus, tmp_path, workers):
    """A checkpoint written mid-epoch while training runs (as ModelCheckpoint does) resumes the data stream with
    exactly the next samples, with and without loader worker processes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    root, cfg = corpus
    kw = dict(packs_per_epoch=5, num_workers=workers, token_budget=300)
    full = Recorder()
    _trainer(tmp_path, 12).fit(full, datamodule=det_dm(root, cfg, **kw))  # crosses two loader epochs

    first = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=7, save_top_k=-1)
    _trainer(tmp_path, 9, [ckpt]).fit(first, datamodule=det_dm(root, cfg, **kw))  # "killed" at step 9
    (step7,) = (tmp_path / "ckpts").glob("*step=7.ckpt")
    resumed = Recorder()
    _trainer(tmp_path, 12).fit(resumed, datamodule=det_dm(root, cfg, **kw), ckpt_path=step7)
    assert len(resumed.seen) == 5
    assert first.seen[:7] + resumed.seen == full.seen
    assert len({i for step in full.seen for i in step}) > 10
