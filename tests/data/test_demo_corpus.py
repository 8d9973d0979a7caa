"""The embedded demo corpus: determinism, exact FakeClue / T2I formats, split hygiene, measured explanations,
family traces and the tokenizer. Builds the ``--small`` variant once (a few seconds) plus three tiny builds."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unigendet.demo import corpus as dc
from unigendet.demo import fakes
from unigendet.demo import measure as msr

FAMILIES = ("real", *fakes.FAMILIES)
TINY = {"n_real": 16, "n_fake_per_family": 4}


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _records(root: Path, split: str) -> list[dict]:
    return json.loads((root / "detection" / f"{split}.json").read_text())


def _t2i(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / "t2i" / f"{split}.jsonl").read_text().splitlines()]


def _image(root: Path, rec: dict) -> np.ndarray:
    return np.asarray(Image.open(root / "detection" / rec["image"]).convert("RGB"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    """The --small corpus built through the CLI entry point, and its printed summary."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "corpus"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = dc.main_demo_data(["--out", str(out), "--small"])
    assert rc == 0
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 1, "demo-data prints exactly one JSON line"
    return out, json.loads(lines[0])


def test_summary_matches_files(corpus):
    root, summary = corpus
    n = {s: len(_records(root, s)) for s in dc.SPLITS}
    assert {s: sum(summary["counts"][s].values()) for s in dc.SPLITS} == n
    assert summary["n_images"] == sum(n.values()) == dc.SMALL["n_real"] + 4 * dc.SMALL["n_fake_per_family"]
    assert summary["t2i"] == {s: len(_t2i(root, s)) for s in dc.SPLITS}
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["counts"] == summary["counts"]
    assert "scikit-image" in manifest["versions"] and (root / "README.md").read_text().startswith("#")
    assert summary["seconds"] > 0 and Path(summary["paths"]["tokenizer"]).is_file()


def test_determinism_by_hash(tmp_path):
    a = dc.build_demo_corpus(tmp_path / "a", seed=0, **TINY)
    b = dc.build_demo_corpus(tmp_path / "b", seed=0, **TINY)
    c = dc.build_demo_corpus(tmp_path / "c", seed=1, **TINY)
    ha, hb, hc = (_tree_hash(tmp_path / k) for k in "abc")
    n_det = TINY["n_real"] + 4 * TINY["n_fake_per_family"]
    assert len(ha) == n_det + TINY["n_real"] + 9  # + T2I copies, 6 split files, tokenizer, manifest, README
    assert ha == hb, "same seed must give byte-identical files"
    assert ha != hc
    changed = sum(ha[k] != hc.get(k) for k in ha if k.endswith(".png"))
    assert changed > 0.9 * sum(k.endswith(".png") for k in ha), "another seed must change (nearly) every image"
    assert a["counts"] == b["counts"] == c["counts"]


def test_workers_do_not_change_the_files(tmp_path):
    dc.build_demo_corpus(tmp_path / "one", seed=3, n_real=8, n_fake_per_family=3, workers=1)
    dc.build_demo_corpus(tmp_path / "two", seed=3, n_real=8, n_fake_per_family=3, workers=2)
    assert _tree_hash(tmp_path / "one") == _tree_hash(tmp_path / "two")


def test_fakeclue_format(corpus):
    root, _ = corpus
    keys = {"image", "label", "cate", "width", "height", "conversations"}
    for split in dc.SPLITS:
        recs = _records(root, split)
        assert isinstance(recs, list) and recs
        for rec in recs:
            assert set(rec) == keys
            assert rec["cate"] in FAMILIES
            assert rec["label"] == (1 if rec["cate"] == "real" else 0)
            assert not Path(rec["image"]).is_absolute() and ".." not in Path(rec["image"]).parts
            assert rec["image"].startswith(f"images/{split}/")
            human, gpt = rec["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>") and len(human["value"]) > 10
            assert gpt["from"] == "gpt"
            prefix = "This is a real image. " if rec["label"] == 1 else "This is a fake image. "
            assert gpt["value"].startswith(prefix) and len(gpt["value"]) > len(prefix) + 40
            with Image.open(root / "detection" / rec["image"]) as im:
                assert im.format == "PNG" and im.mode == "RGB"
                assert im.size == (rec["width"], rec["height"])
            for side in (rec["width"], rec["height"]):
                assert side % 8 == 0 and dc.SIZE_RANGE[0] <= side <= dc.SIZE_RANGE[1]


def test_t2i_format_and_prompt_hygiene(corpus):
    root, _ = corpus
    prompts = {}
    for split in dc.SPLITS:
        rows = _t2i(root, split)
        assert rows
        for row in rows:
            assert set(row) == {"image_path", "prompt"}
            assert not Path(row["image_path"]).is_absolute() and ".." not in Path(row["image_path"]).parts
            path = root / "t2i" / row["image_path"]
            assert path.is_file() and not path.is_symlink()
            assert len(row["prompt"].split()) >= 5
        prompts[split] = {r["prompt"] for r in rows}
    assert not (prompts["test"] & prompts["train"]) and not (prompts["val"] & prompts["train"])
    # The T2I images are exactly the real detection images.
    real = {hashlib.sha256((root / "detection" / r["image"]).read_bytes()).hexdigest()
            for s in dc.SPLITS for r in _records(root, s) if r["label"] == 1}
    t2i = {hashlib.sha256((root / "t2i" / r["image_path"]).read_bytes()).hexdigest()
           for s in dc.SPLITS for r in _t2i(root, s)}
    assert t2i == real


def test_every_family_in_train_and_held_out(corpus):
    root, _ = corpus
    for split in dc.SPLITS:
        assert {r["cate"] for r in _records(root, split)} == set(FAMILIES), split
    train = _records(root, "train")
    assert 0.3 < np.mean([r["label"] for r in train]) < 0.7, "real and fake are roughly balanced"


def test_no_image_shared_between_train_and_held_out(corpus):
    root, _ = corpus

    def hashes(split):
        return {hashlib.sha256(_image(root, r).tobytes()).hexdigest() for r in _records(root, split)}

    train = hashes("train")
    assert not (hashes("val") & train) and not (hashes("test") & train)


def test_cells_partition_every_photo():
    photos = dc.load_sources()
    cells = dc.make_cells(photos)
    for si, img in enumerate(photos):
        mine = [c for c in cells if c.source == si]
        assert {c.split for c in mine} == set(dc.SPLITS), dc.SOURCES[si].name
        area = sum((c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) for c in mine)
        assert area == img.shape[0] * img.shape[1]  # disjoint tiles covering the photo
        assert len({c.position for c in mine}) == len(mine)


def test_explanations_vary_within_each_family(corpus):
    root, _ = corpus
    recs = [r for s in dc.SPLITS for r in _records(root, s)]
    for fam in FAMILIES:
        answers = [r["conversations"][1]["value"] for r in recs if r["cate"] == fam]
        assert len(set(answers)) > 0.5 * len(answers), fam


def test_explanations_are_written_from_measurements(corpus):
    """Re-measuring the saved image reproduces what the answer says."""
    root, _ = corpus
    recs = [r for s in dc.SPLITS for r in _records(root, s)]
    n_checked = 0
    for rec in recs:
        answer = rec["conversations"][1]["value"]
        if rec["cate"] == "gan_upsample":
            m = msr.measure(_image(root, rec))
            region = msr.region_name(divmod(int(np.argmax(m.peak_regions)), 3))
            assert re.search(rf"The {region} (region|and)", answer), (region, answer)
            n_checked += 1
        elif rec["cate"] == "diffusion_like":
            m = msr.measure(_image(root, rec))
            assert f"grain of about {m.noise:.1f} grey levels" in answer
            assert ("A faint grid repeats every 4 pixels" in answer) == (m.peaks[4] > msr.PEAK_THRESHOLD), answer
            n_checked += 1
        elif rec["cate"] == "spectral":
            m = msr.measure(_image(root, rec))
            assert ("A faint regular grid lies over it" in answer) == (m.peaks[4] > msr.PEAK_THRESHOLD), answer
            n_checked += 1
        elif rec["cate"] == "real":
            m = msr.measure(_image(root, rec))
            assert f"slope {m.spectral_slope:.1f}" in answer
            n_checked += 1
    assert n_checked >= 20


def _family_measurements(root: Path) -> dict[str, list[msr.Measurements]]:
    out: dict[str, list[msr.Measurements]] = {f: [] for f in FAMILIES}
    for s in dc.SPLITS:
        for r in _records(root, s):
            out[r["cate"]].append(msr.measure(_image(root, r)))
    return out


@pytest.fixture(scope="module")
def measured(corpus):
    return _family_measurements(corpus[0])


def test_gan_family_has_upsampling_peaks(measured):
    def peak(m):
        return np.log10(max(m.peaks[2], m.peaks[4]))

    gan = np.mean([peak(m) for m in measured["gan_upsample"]])
    real = np.mean([peak(m) for m in measured["real"]])
    assert gan > real + 1.0, (gan, real)  # at least 10x higher on a log scale


def test_spectral_family_is_gaussian_and_periodic(measured):
    spectral, real = measured["spectral"], measured["real"]
    # camera noise makes the real crops' gradients more Gaussian too (median 4.6 on the full val split, 2.9 spectral)
    assert np.median([m.grad_kurtosis for m in spectral]) < 3.5 < np.median([m.grad_kurtosis for m in real])
    assert np.median([m.wrap_ratio for m in spectral]) < 1.5 < np.median([m.wrap_ratio for m in real])


def test_diffusion_family_has_uniform_grain(measured):
    """The grain is the same everywhere; the real crops' shot noise follows their brightness (at 32-48 px the 3x3
    regional estimates are noisy: about 0.13 against 0.17 on the full corpus, 0.04 against 0.22 before the real
    crops carried camera noise)."""
    diff, real = measured["diffusion_like"], measured["real"]
    assert np.mean([m.noise_cv for m in diff]) < 0.8 * np.mean([m.noise_cv for m in real])
    assert np.mean([m.noise for m in diff]) > np.mean([m.noise for m in real])


def test_spectral_and_diffusion_fakes_carry_a_period_4_grid(measured):
    """The synthesis' fingerprint lies on the spectrum's axes, the latent decoder's on its diagonals; real crops have
    no such peak."""
    def share(family, direction=None):
        ms = measured[family]
        return np.mean([m.peaks[4] > msr.PEAK_THRESHOLD and (direction is None or m.peak_dirs[4] == direction)
                        for m in ms])

    assert share("spectral", "axes") >= 0.6, share("spectral")
    assert share("diffusion_like", "diagonals") >= 0.8, share("diffusion_like")
    assert share("real") <= 0.1


def _splices(root: Path) -> tuple[list[np.ndarray], list[tuple[fakes.FakeResult, msr.Measurements]]]:
    """12 real train crops, and 11 splices of consecutive pairs with their measurements."""
    reals = [_image(root, r) for r in _records(root, "train") if r["label"] == 1][:12]
    out = []
    for i in range(len(reals) - 1):
        res = fakes.splice(reals[i], reals[i + 1], np.random.default_rng(i), copy_move=False)
        out.append((res, msr.measure(res.image, mask=res.info["mask"])))
    return reals, out


def test_splice_region_carries_an_interpolation_residue(corpus):
    _, splices = _splices(corpus[0])
    inside = [m.mask_stats["grid_in"] for _, m in splices]
    outside = [m.mask_stats["grid_out"] for _, m in splices]
    assert np.median(inside) > msr.PEAK_THRESHOLD and np.median(inside) > 10 * np.median(outside), (inside, outside)


def test_splice_leaves_a_seam_and_lighting_mismatch(corpus):
    reals, splices = _splices(corpus[0])
    seams = [m.mask_stats["seam_ratio"] for _, m in splices]
    jumps = [abs(m.mask_stats["luma_in"] - m.mask_stats["luma_out"]) for _, m in splices]
    assert all(res.image.shape == reals[i].shape for i, (res, _) in enumerate(splices))
    assert np.mean(seams) > 1.2, seams
    # Without a splice the same statistics show no jump: compare a random mask on the untouched host.
    control = []
    for i in range(len(reals) - 1):
        mask = np.zeros(reals[i].shape[:2], bool)
        mask[10:40, 12:44] = True
        mc = msr.measure(reals[i], mask=mask)
        control.append(abs(mc.mask_stats["luma_in"] - mc.mask_stats["luma_out"]))
    assert np.mean(jumps) > np.mean(control)


def test_tokenizer_special_ids_and_round_trip(corpus):
    from tokenizers import Tokenizer

    root, _ = corpus
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == dc.VOCAB_SIZE == 2048
    ids = [tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")]
    assert ids == [2044, 2045, 2046, 2047]
    text = "This is a fake image. The upper-left region shows a regular checkerboard pattern, 12% brighter."
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text
    assert max(enc.ids) < 2044 and len(enc.ids) < len(text)  # merges were learnt: fewer tokens than bytes
    assert tok.encode("<|im_start|>hi<|im_end|>").ids[0] == 2044


def test_size_range_validation(tmp_path):
    with pytest.raises(ValueError):
        dc.build_demo_corpus(tmp_path, n_real=3, n_fake_per_family=3, size_range=(60, 128))
