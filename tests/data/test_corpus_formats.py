"""Corpora as users hold them: WebDataset / img2dataset tar shards and Hugging Face datasets saved to disk (and
their Parquet exports), built here, read by the DataModules: the same samples as the JSON corpus, counted skips for
damaged shards, exact mid-shard resume, passes that continue on another layout, labels read by name."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from data_modules.detection import DetectionDataModule
from data_modules.stream import PackedStream
from data_modules.t2i import T2IDataModule
from data_modules.units import TarUnits
from tests.data.test_data_modules import SIZES, corpus  # noqa: F401 (corpus is a fixture)
from unigendet.inputs.json_stream import CorpusError
from unigendet.inputs.rows import Columns, TarRecords
from unigendet.inputs.skips import SkipCounter
from unigendet.inputs.tar_shards import expand_braces, expand_shards, iter_samples, write_shard

#####################################################################################################
# Writing shards
#####################################################################################################


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], end_blocks: bool = True) -> Path:
    """A tar of ``key.field`` members (:func:`write_shard`); ``end_blocks=False``: cut off its end-of-archive
    blocks, as an interrupted writer leaves it."""
    write_shard(path, samples)
    if not end_blocks:
        data = path.read_bytes().rstrip(b"\0")
        path.write_bytes(data + b"\0" * (-len(data) % 512))
    return path


def t2i_shards(root: Path, per_shard: int = 4, n: int = 12) -> tuple[Path, list[dict]]:
    """The corpus's 12 T2I pairs as img2dataset shards: ``00000.tar`` .. with ``key.jpg/.txt/.json``."""
    rows = [json.loads(line) for line in (root / "t2i.jsonl").read_text().splitlines()][:n]
    out = root / "t2i_tars"
    out.mkdir(exist_ok=True)
    for s in range(0, n, per_shard):
        write_tar(out / f"{s // per_shard:05d}.tar", [
            (f"{i:09d}", {"jpg": (root / rows[i]["image_path"]).read_bytes(), "txt": rows[i]["prompt"].encode(),
                          "json": json.dumps({"caption": rows[i]["prompt"], "key": f"{i:09d}"}).encode()})
            for i in range(s, min(n, s + per_shard))])
    return out, rows


def det_samples(root: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The corpus's good detection records as tar samples: the image and a .json with label + conversation."""
    recs = json.loads((root / "det.json").read_text())[:24]
    return [(f"det/{i:05d}", {"png": (root / r["image"]).read_bytes(),
                              "json": json.dumps({k: r[k] for k in ("label", "cate", "conversations")}).encode()})
            for i, r in enumerate(recs)]


def loader(ds, workers=0):
    return StatefulDataLoader(ds, batch_size=None, num_workers=workers)


#####################################################################################################
# Listing and reading shards
#####################################################################################################


def test_brace_patterns_folders_and_missing_shards(tmp_path):
    assert expand_braces("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    for i in (0, 1, 3):  # 00002.tar failed in img2dataset: a gap
        write_tar(tmp_path / f"{i:05d}.tar", [("k", {"txt": b"x"})])
    skips = SkipCounter()
    shards = expand_shards(f"{tmp_path}/{{00000..00003}}.tar", skips)
    assert [Path(s).name for s in shards] == ["00000.tar", "00001.tar", "00003.tar"]
    assert skips.counts == {"missing_file": 1} and skips.examples["missing_file"] == "00002.tar"
    assert expand_shards(tmp_path, SkipCounter()) == shards  # a folder: its *.tar, sorted
    assert len(expand_shards(f"{tmp_path}/00000.tar::{tmp_path}/0000[13].tar", SkipCounter())) == 3
    with pytest.raises(CorpusError, match="no tar shard"):
        expand_shards(f"{tmp_path}/{{7..9}}.tar", SkipCounter())


def test_samples_group_members_by_key_and_resume_from_a_cursor(tmp_path):
    shard = write_tar(tmp_path / "a.tar", [("x/0001", {"jpg": b"J1", "txt": b"one", "json": b"{}"}),
                                           ("x/0002", {"jpg": b"J2", "txt": b"two"}),
                                           ("x/0003", {"jpg": b"J3", "cls": b"1"})])
    skips = SkipCounter()
    samples = list(iter_samples(str(shard), skips))
    assert [(s.key, sorted(s.fields)) for s in samples] == [
        ("x/0001", ["jpg", "json", "txt"]), ("x/0002", ["jpg", "txt"]), ("x/0003", ["cls", "jpg"])]
    assert samples[0].offset == 0 and samples[0].next_offset == samples[1].offset and not skips.counts
    rest = list(iter_samples(str(shard), skips, samples[1].offset))  # straight to the second sample
    assert [(s.key, s.fields) for s in rest] == [(s.key, s.fields) for s in samples[1:]]


def test_damaged_shards_keep_what_precedes_the_damage_and_count_it(tmp_path):
    good = [(f"{i:04d}", {"jpg": bytes([i]) * 700, "txt": b"caption"}) for i in range(4)]
    whole = write_tar(tmp_path / "whole.tar", good).read_bytes()
    first = list(iter_samples(str(tmp_path / "whole.tar"), SkipCounter()))

    cases = {
        "cut_inside_a_member": (whole[: first[2].offset + 512 + 300], "truncated_tar", 2),
        "no_end_of_archive": (write_tar(tmp_path / "x.tar", good, end_blocks=False).read_bytes(), "truncated_tar", 4),
        "garbage_header": (whole[: first[3].offset] + b"\x7f" * 512 + whole[first[3].offset + 512:], "corrupt_tar", 3),
    }
    for name, (data, reason, kept) in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
        skips = SkipCounter()
        samples = list(iter_samples(str(tmp_path / f"{name}.tar"), skips))
        assert [s.key for s in samples] == [f"{i:04d}" for i in range(kept)], name
        assert dict(skips.counts) == {reason: 1}, (name, skips.counts)
    skips = SkipCounter()
    assert not list(iter_samples(str(tmp_path / "missing.tar"), skips)) and skips.counts == {"missing_file": 1}


#####################################################################################################
# Text-to-image shards
#####################################################################################################


def t2i_dm(root, cfg, train, **kw):
    args = dict(train=str(train), tokenizer=str(root / "tokenizer.json"), token_budget=300, num_workers=0,
                packs_per_epoch=3, caption_dropout=0.0, **SIZES)
    args.update(kw)
    return T2IDataModule(**args).connect(cfg)


def test_tar_shards_deliver_the_same_pairs_as_the_jsonl_corpus(corpus):  # noqa: F811
    root, cfg = corpus
    tars, rows = t2i_shards(root)
    jsonl = t2i_dm(root, cfg, root / "t2i.jsonl", val=str(root / "t2i.jsonl"))
    shards = t2i_dm(root, cfg, f"{tars}/{{00000..00002}}.tar", val=f"{tars}/{{00000..00002}}.tar")

    def pairs(dm):  # pair number -> VAE target, from one evaluation pass ("t2i.jsonl:7", "00002.tar:000000007")
        out = {}
        for b in dm.val_dataloader():
            out.update({int(sid.rsplit(":", 1)[1]): img for sid, img in zip(b.sample_ids, b.vae_images, strict=True)})
        return out

    a, b = pairs(jsonl), pairs(shards)
    assert len(a) == len(rows) and sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # training: one record epoch of the shards trains every pair once, several shards interleaved per worker
    stream = shards.stream("train", budget=300, packs_per_epoch=50)
    keys = [k for batch, _ in zip(loader(stream), range(50), strict=False) for k in batch.stats["records"]]
    first = [(shard, cursor) for e, shard, cursor in keys if e == 0]
    assert len(first) == len(set(first)) == len(rows)
    assert len({shard for shard, _ in first[:3]}) == 3  # the first samples come from three different shards


@pytest.mark.parametrize("workers", [0, 2])
def test_a_tar_stream_resumes_mid_shard_with_exactly_the_next_samples(corpus, workers):  # noqa: F811
    root, cfg = corpus
    tars, _ = t2i_shards(root, per_shard=3)
    dm = t2i_dm(root, cfg, tars, num_workers=workers, caption_dropout=0.3, interleave=2)

    def fresh():
        return dm.loader(dm.stream("train", budget=200, packs_per_epoch=6))

    reference = []
    ref = fresh()
    for _ in range(2):  # two loader epochs: record epochs and shards are crossed
        reference += [(b.stats["records"], b.vae_timesteps.tolist()) for b in ref]
    first = fresh()
    it = iter(first)
    got = [(b.stats["records"], b.vae_timesteps.tolist()) for b in (next(it) for _ in range(4))]
    state = first.state_dict()
    del it, first
    resumed = fresh()
    resumed.load_state_dict(state)
    got += [(b.stats["records"], b.vae_timesteps.tolist()) for b in resumed]
    got += [(b.stats["records"], b.vae_timesteps.tolist()) for b in resumed]
    assert got == reference
    assert any(cursor > 0 for recs, _ in got[:4] for _, _, cursor in recs)  # it stopped inside a shard


def test_a_tar_pass_continues_on_another_layout(corpus):  # noqa: F811
    """2 ranks reading 5 shards (2 at a time) are checkpointed mid-shard and resumed on 3, then on 1: each sample
    is trained once per record epoch, open shards continued from their cursors by the new readers."""
    root, cfg = corpus
    tars, rows = t2i_shards(root, per_shard=3)
    write_tar(tars / "00004.tar", [])  # an empty shard
    dm = t2i_dm(root, cfg, tars)
    units = TarUnits(expand_shards(tars, SkipCounter()), TarRecords("t2i", Columns()))
    planner = dm.planner("train")
    trained, progress = [], None
    for world, packs in ((2, 3), (3, 2), (1, 60)):
        out = []
        for rank in range(world):
            ds = PackedStream(units, planner, cfg, token_budget=200, packs_per_epoch=10_000, rank=rank,
                              world_size=world, interleave=2, seed=3)
            if progress is not None:
                ds.reshard(progress)
            it = iter(loader(ds))
            for _ in range(packs):
                b = next(it)
                ds.record(b)
                trained += [(e, s, c) for e, s, c in b.stats["records"]]
            out.append(ds.progress())
        if progress is None:
            assert any(st["open"] and st["open"][0][2] > 0 for p in out for st in p["workers"].values())
        progress = out
    done = min(st["epoch"] for p in progress for st in p["workers"].values())
    assert done >= 2
    counts = Counter((e, s, c) for e, s, c in trained if e < done)
    assert set(counts.values()) == {1} and len(counts) == done * len(rows)


#####################################################################################################
# Detection shards
#####################################################################################################


def det_dm_for(root, cfg, train, **kw):
    args = dict(train=str(train), val=str(train), tokenizer=str(root / "tokenizer.json"), token_budget=400,
                num_workers=0, packs_per_epoch=4, **SIZES)
    args.update(kw)
    return DetectionDataModule(**args).connect(cfg)


def test_detection_tar_shards_carry_label_and_conversation_in_json(corpus, tmp_path):  # noqa: F811
    root, cfg = corpus
    samples = det_samples(root)
    bad = [("det/bad-label", {"png": samples[0][1]["png"], "json": b'{"label": 2}'}),
           ("det/no-image", {"json": samples[0][1]["json"]}),
           ("det/bad-json", {"png": samples[0][1]["png"], "json": b"{oops"}),
           ("det/verdict", {"png": samples[1][1]["png"], "cls": b"0"}),
           ("det/named", {"png": samples[2][1]["png"], "json": b'{"label": "Real"}'}),
           ("det/corrupt", {"png": b"\x89PNG not really", "json": samples[3][1]["json"]})]
    write_tar(tmp_path / "d0.tar", samples[:12] + bad)
    write_tar(tmp_path / "d1.tar", samples[12:])
    dm = det_dm_for(root, cfg, f"{tmp_path}/d{{0..1}}.tar", conversation_column="conversations")
    recs = {r.id.split(":")[1]: r for r in dm.split_records("val")}
    ref = json.loads((root / "det.json").read_text())
    assert len(recs) == 24 + 3
    assert all(recs[f"det/{i:05d}"].label == ref[i]["label"] for i in range(24))
    assert recs["det/00003"].answer == ref[3]["conversations"][1]["value"]
    assert (recs["det/verdict"].label, recs["det/verdict"].answer) == (0, "This is a fake image.")
    assert recs["det/named"].label == 1 and recs["det/verdict"].prompt == "Does the image looks real/fake?"
    assert dict(dm.read_skips.counts) == {"bad_label": 1, "missing_file": 1, "malformed_record": 1}
    batches = list(dm.val_dataloader())  # the corrupt image member is found when the sample is planned
    assert sum(b.stats["samples"] for b in batches) == 26 and all(b.det_labels.numel() for b in batches)
    assert batches[-1].stats["skipped"] == {"unreadable_image": 1}  # the worker's running count
    train = next(iter(dm.train_dataloader()))  # streamed from the shards, images decoded from the members
    assert train.vit_tokens.numel() and train.det_labels.numel() == train.stats["samples"]


#####################################################################################################
# Hugging Face datasets on disk
#####################################################################################################

datasets = pytest.importorskip("datasets", reason="the `datasets` package (a dev dependency) writes the folders")
datasets.disable_progress_bars()


def hf_detection(root: Path, names=("real", "fake")) -> datasets.Dataset:
    """The corpus's 24 good detection records as an HF dataset with a ClassLabel in the given order."""
    recs = json.loads((root / "det.json").read_text())[:24]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names)),
                               "cate": datasets.Value("string"),
                               "conversations": [{"from": datasets.Value("string"),
                                                  "value": datasets.Value("string")}]})
    by_name = {0: "fake", 1: "real"}
    return datasets.Dataset.from_dict({
        "image": [str(root / r["image"]) for r in recs],
        "label": [list(names).index(by_name[r["label"]]) for r in recs],
        "cate": [r["cate"] for r in recs], "conversations": [r["conversations"] for r in recs]}, features=feats)


def test_saved_hf_datasets_and_parquet_exports_read_labels_by_name(corpus, tmp_path):  # noqa: F811
    root, cfg = corpus
    ds = hf_detection(root, names=("real", "fake"))  # index 0 = real: the opposite of FakeClue's 0 = fake
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "export.parquet"))
    ref = json.loads((root / "det.json").read_text())[:24]
    jsonl = det_dm_for(root, cfg, root / "det.json")
    for path in (tmp_path / "saved", tmp_path / "export.parquet", tmp_path / "dict" / "train"):
        dm = det_dm_for(root, cfg, path)
        recs = dm.split_records("val")
        assert [r.label for r in recs] == [r["label"] for r in ref], path
        assert [r.answer for r in recs] == [r["conversations"][1]["value"] for r in ref]
        assert [r.cate for r in recs] == [r["cate"] for r in ref]
        a, b = list(jsonl.val_dataloader()), list(dm.val_dataloader())
        assert [x.det_labels.tolist() for x in a] == [y.det_labels.tolist() for y in b]
        assert all(torch.equal(x.vit_tokens, y.vit_tokens) for x, y in zip(a, b, strict=True))
    with pytest.raises(CorpusError, match="DatasetDict"):
        det_dm_for(root, cfg, tmp_path / "dict").split_records("val")
    with pytest.raises(CorpusError, match="no column"):
        det_dm_for(root, cfg, tmp_path / "saved", image_column="jpg").split_records("val")


def test_saved_hf_t2i_dataset_and_verdict_only_detection(corpus, tmp_path):  # noqa: F811
    root, cfg = corpus
    rows = [json.loads(line) for line in (root / "t2i.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_dict({"jpg": [(root / r["image_path"]).read_bytes() for r in rows],
                                     "TEXT": [r["prompt"] for r in rows]})
    ds.save_to_disk(str(tmp_path / "laion"))
    a = t2i_dm(root, cfg, root / "t2i.jsonl", val=str(root / "t2i.jsonl"))
    b = t2i_dm(root, cfg, tmp_path / "laion", val=str(tmp_path / "laion"), image_column="jpg",
               caption_column="TEXT")
    assert [r.prompt for r in b.split_records("val")] == [r["prompt"] for r in rows]
    assert all(torch.equal(x, y) for p, q in zip(a.val_dataloader(), b.val_dataloader(), strict=True)
               for x, y in zip(p.vae_images, q.vae_images, strict=True))
    # GenImage-style: image + string label, no explanation: the answer is the verdict
    det = datasets.Dataset.from_dict({"image": [(root / r["image_path"]).read_bytes() for r in rows[:4]],
                                      "label": ["ai", "nature", "ai", "weird"]})
    det.save_to_disk(str(tmp_path / "genimage"))
    dm = det_dm_for(root, cfg, tmp_path / "genimage", label_map={"AI": 0, "nature": 1})
    recs = dm.split_records("val")
    assert [(r.label, r.answer) for r in recs] == [(0, "This is a fake image."), (1, "This is a real image."),
                                                   (0, "This is a fake image.")]
    assert dm.read_skips.counts == {"bad_label": 1}
