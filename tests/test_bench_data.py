"""bench/data_pipeline.py at test size: one JSON line per configuration, the counts ``measure`` reports are those of
an independent iteration of the same loader, and the written 512 px JPEG corpus reads back whole, without skips."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import REPO
from unigendet.inputs.skips import SkipCounter

sys.path.insert(0, str(REPO / "bench"))

N_IMAGES = 4


@pytest.fixture(scope="module")
def jpeg_corpus(tmp_path_factory):
    from data_pipeline import write_jpeg_corpus

    out = tmp_path_factory.mktemp("data_bench") / f"jpeg512_{N_IMAGES}"  # the folder main() reuses
    return out, write_jpeg_corpus(out, N_IMAGES)


def test_main_prints_one_json_line_per_configuration(jpeg_corpus, capsys):
    from data_pipeline import main

    out, _ = jpeg_corpus
    rows = main(["--corpora", "jpeg512", "--jpeg-images", str(N_IMAGES), "--data-dir", str(out.parent),
                 "--presets", "demo", "bagel-7b-mot", "--workers", "0", "1", "--batches", "1"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == rows
    assert [(r["preset"], r["side"], r["workers"]) for r in rows] == [
        (p, s, w) for p in ("demo", "bagel-7b-mot") for s in ("detection", "t2i") for w in (0, 1)]
    for r in rows:
        assert r["bench"] == "data_pipeline" and r["corpus"] == "jpeg512" and r["batches"] == 1
        assert r["token_budget"] == {"demo": 4096, "bagel-7b-mot": 16384}[r["preset"]]
        assert r["skipped"] == {}
        assert r["samples"] > 0 and 0 < r["tokens"] <= r["token_budget"]
        assert r["samples_per_s"] == pytest.approx(r["samples"] / r["elapsed_s"], rel=0.01)
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["elapsed_s"], rel=0.01)
        assert r["first_batch_s"] > 0 and r["cpus"] >= 1
        assert ("samples_per_s_per_worker" in r) == (r["workers"] > 0)
    # the same loader contents whatever the number of workers (one worker reads the whole shard)
    for p in ("demo", "bagel-7b-mot"):
        for s in ("detection", "t2i"):
            w0, w1 = (next(r for r in rows if (r["preset"], r["side"], r["workers"]) == (p, s, w)) for w in (0, 1))
            assert (w0["samples"], w0["tokens"]) == (w1["samples"], w1["tokens"])


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("side", ["detection", "t2i"])
def test_measure_counts_what_the_loader_yields(jpeg_corpus, side, workers):
    from data_pipeline import batch_counts, make_datamodule, measure, preset_config

    _, paths = jpeg_corpus
    cfg = preset_config("demo", paths["tokenizer"])
    n = 3

    def loader():
        return make_datamodule(side, paths, cfg, workers, budget=1024, packs=n + 1).train_dataloader()

    m = measure(loader(), n)
    counts = [batch_counts(b) for b in loader()]  # a fresh, identical stream, iterated by hand
    assert len(counts) == n + 1
    assert (m["first_samples"], m["first_tokens"]) == counts[0]
    assert m["batches"] == n
    assert m["samples"] == sum(c[0] for c in counts[1:])
    assert m["tokens"] == sum(c[1] for c in counts[1:])
    assert m["elapsed_s"] > 0 and m["batch_ms_median"] > 0 and m["skipped"] == {}


def test_measure_stops_at_the_end_of_the_loader(jpeg_corpus):
    from data_pipeline import make_datamodule, measure, preset_config

    _, paths = jpeg_corpus
    dm = make_datamodule("t2i", paths, preset_config("demo", paths["tokenizer"]), 0, budget=1024, packs=2)
    assert measure(dm.train_dataloader(), 10)["batches"] == 1


@pytest.mark.parametrize("preset", ["demo", "bagel-7b-mot"])
def test_the_jpeg_corpus_reads_back_whole(jpeg_corpus, preset):
    from data_pipeline import make_datamodule, preset_config

    out, paths = jpeg_corpus
    assert len(list((out / "images").glob("*.jpg"))) == N_IMAGES
    cfg = preset_config(preset, paths["tokenizer"])
    for side in ("detection", "t2i"):
        dm = make_datamodule(side, paths, cfg, 0, budget=16384, packs=1)
        records = dm.split_records("train")
        assert len(records) == N_IMAGES and not dm.read_skips.counts
        skips = SkipCounter()
        planner = dm.planner("train")
        for rec in records:
            img = dm.record_image("train", rec, skips)
            assert img is not None and img.size == (512, 512) and img.mode == "RGB"
            assert planner(rec, torch.Generator().manual_seed(0), skips) is not None
        assert not skips.counts
    # the preset's transforms: the demo preset reads 512 px at its 64 px bound, BAGEL at native size
    vit, vae = dm.vit_tf().target_size(512, 512), dm.vae_tf().target_size(512, 512)
    assert (vit, vae) == {"demo": ((64, 64), (64, 64)), "bagel-7b-mot": ((518, 518), (512, 512))}[preset]
    labels = [r["label"] for r in json.loads((out / "detection.json").read_text())]
    assert sorted(set(labels)) == [0, 1]


def test_the_same_images_as_tar_shards_and_parquet_read_whole(jpeg_corpus):
    """--formats: the jpeg512 corpus rewritten as tar shards and Parquet files delivers every image of one pass, in
    every format, without skips."""
    from data_pipeline import main

    out, _ = jpeg_corpus
    rows = main(["--corpora", "jpeg512", "--jpeg-images", str(N_IMAGES), "--data-dir", str(out.parent),
                 "--presets", "demo", "--formats", "files", "tar", "parquet", "--workers", "0", "--batches", "2",
                 "--token-budget", "1024"])
    assert [(r["side"], r["format"]) for r in rows] == [
        (s, f) for s in ("detection", "t2i") for f in ("files", "tar", "parquet")]
    for r in rows:
        assert r["skipped"] == {} and r["samples"] > 0 and r["format"] in ("files", "tar", "parquet")
    assert sorted(p.name for p in (out / "detection_tars").iterdir()) == [f"{k:05d}.tar" for k in range(8)]
