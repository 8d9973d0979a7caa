"""unigendet.demo.feature_net: the source label read from a caption, training on a small corpus, the saved file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.demo import corpus as dc
from unigendet.demo import feature_net as fn


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("fnet") / "corpus"
    dc.build_demo_corpus(out, seed=0, n_real=40, n_fake_per_family=1, workers=1)
    return out


def test_every_subject_names_one_group_only():
    """The premise of source_group: no subject of one group occurs inside a subject of another."""
    for src in dc.SOURCES:
        for subject in src.subjects:
            others = {o.group for o in dc.SOURCES for s in o.subjects if subject in s and o.group != src.group}
            assert not others, (subject, others)
    assert len(fn.GROUPS) == len({s.group for s in dc.SOURCES}) == 16


def test_captions_of_a_built_corpus_map_to_their_group(small_corpus):
    lines = (small_corpus / "t2i" / "train.jsonl").read_text().splitlines()
    for line in lines:
        caption = json.loads(line)["prompt"]
        group = fn.GROUPS[fn.source_group(caption)]
        assert any(subject in caption for s in dc.SOURCES if s.group == group for subject in s.subjects)
    with pytest.raises(ValueError, match="names 0 source groups"):
        fn.source_group("a picture of nothing in particular")
    with pytest.raises(ValueError, match="names 2 source groups"):
        fn.source_group("a brick wall next to a wall clock")


def test_the_saved_file_round_trips_and_a_seed_trains_the_same_network(small_corpus, tmp_path):
    net, report = fn.train_feature_net(small_corpus, seed=0, epochs=2)
    assert report["train_images"] == len((small_corpus / "t2i" / "train.jsonl").read_text().splitlines())
    images = [Image.open(p) for p in sorted((small_corpus / "t2i" / "images").rglob("*.png"))[:12]]
    feats = fn.features(net, images)
    assert feats.shape == (12, 128) and feats.dtype == np.float64 and np.isfinite(feats).all()
    path = tmp_path / "fnet.safetensors"
    fn.save_feature_net(net, report, path)
    loaded, loaded_report = fn.load_feature_net(path)
    assert loaded_report == report
    np.testing.assert_array_equal(fn.features(loaded, images), feats)
    again, _ = fn.train_feature_net(small_corpus, seed=0, epochs=2)
    for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    other, _ = fn.train_feature_net(small_corpus, seed=1, epochs=2)
    assert not torch.equal(other.classifier.weight, net.classifier.weight)


@pytest.mark.slow  # ~1 min on 2 cores: `make test-all`
def test_training_memorises_a_small_training_set(small_corpus):
    net, report = fn.train_feature_net(small_corpus, seed=0, epochs=120)
    captions = [json.loads(line)["prompt"] for line in (small_corpus / "t2i" / "train.jsonl").read_text().splitlines()]
    majority = np.bincount([fn.source_group(c) for c in captions]).max() / len(captions)
    assert report["train_acc"] > max(0.9, majority), report
