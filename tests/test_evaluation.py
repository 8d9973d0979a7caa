"""The evaluation protocol: text metrics against reference implementations, summaries against hand-computed values,
and ``python -m unigendet test`` end to end on a trained checkpoint, its report checked against an independent
detection / generation pass over the same EMA weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.inception_file import inception_weights  # noqa: F401  (a fixture)
from tests.test_resume import REPO, SMALL, corpus, fit_command, run  # noqa: F401  (corpus is a fixture)
from unigendet.evaluation.protocol import EvalConfig
from unigendet.evaluation.report import flat_metrics, markdown
from unigendet.evaluation.scores import summarize_detection
from unigendet.evaluation.text_metrics import css, parse_label, rouge_l

# (reference, prediction, CSS from scikit-learn 1.9.1 TfidfVectorizer().fit_transform([ref, pred]) + cosine_similarity,
#  ROUGE-L F from rouge-score 0.1.2 RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)), computed once in a
# scratch environment (neither package is a dependency)
REFERENCE = [
    ("This is a fake image. The lighting on the face is inconsistent and the hands have six fingers.",
     "This is a fake image. The face has inconsistent lighting, and one hand shows extra fingers.",
     0.5423913240058535, 0.6470588235294118),
    ("This is a real image. Natural noise, consistent shadows.", "This is a fake image. Smooth textures everywhere.",
     0.2532094495161745, 0.47058823529411764),
    ("A a I", "the cats are running quickly", 0.0, 0.0),
    ("Running runners ran; generated generation GENERATES.", "run runner generate generated",
     0.11521554337793122, 0.8),
]


@pytest.mark.parametrize("ref,pred,expected_css,expected_rouge", REFERENCE)
def test_css_and_stemmed_rouge_l_match_the_reference_implementations(ref, pred, expected_css, expected_rouge):
    assert css(ref, pred) == pytest.approx(expected_css, abs=1e-9)
    assert css(pred, ref) == pytest.approx(expected_css, abs=1e-9)  # symmetric
    assert rouge_l(pred, ref) == pytest.approx(expected_rouge, abs=1e-6)


def test_stemming_is_what_makes_the_last_pair_score():
    ref, pred = REFERENCE[3][:2]
    assert rouge_l(pred, ref, stem=False) < 0.5 < rouge_l(pred, ref)


@pytest.mark.parametrize("text,label", [
    ("This is a fake image. The hands ...", 0), ("This is a REAL image.", 1), ("Real photo, not fake", 1),
    ("It looks fake, not real.", 0), ("fakes are everywhere", None), ("unreal lighting", None), ("", None),
    (None, None),
])
def test_label_is_the_first_verdict_word(text, label):
    assert parse_label(text) == label


def test_summary_against_hand_computed_values():
    def row(label, p_fake, text, cate):
        return {"label": label, "p_fake": p_fake, "head": "fake" if p_fake >= 0.5 else "real", "text": text,
                "cate": cate, "rouge_l": 0.5 if text == label else 0.1, "css": 0.25}

    rows = [row("fake", 0.9, "fake", "a"), row("fake", 0.4, None, "a"), row("fake", 0.7, "real", "b"),
            row("real", 0.2, "real", "b"), row("real", 0.6, "real", "b")]
    s = summarize_detection(rows)
    assert (s["n"], s["n_fake"], s["n_real"]) == (5, 3, 2)
    # head: predictions fake, real, fake, real, fake vs truth fake, fake, fake, real, real -> 3/5 right
    # F1(fake) = 2*2/(2*2+1+1) = 2/3, F1(real) = 2*1/(2*1+1+1) = 1/2, macro 7/12
    assert s["head"]["acc"] == pytest.approx(0.6)
    assert s["head"]["f1"] == pytest.approx(7 / 12)
    # AUROC: fake scores {.9,.4,.7} vs real {.2,.6}: pairs won 2 + 1 + 2 = 5 of 6
    assert s["head"]["auroc"] == pytest.approx(5 / 6)
    # text: fake, (unparsed -> wrong), real, real, real vs truth -> 3/5; F1(fake)=2/(2+2)=1/2, F1(real)=4/(4+2)=2/3
    assert s["text"]["acc"] == pytest.approx(0.6)
    assert s["text"]["f1"] == pytest.approx(7 / 12)
    assert s["text"]["unparsed"] == 1
    assert s["text"]["agrees_with_head"] == pytest.approx(2 / 5)  # rows 1 and 4
    assert s["rouge_l"] == pytest.approx((0.5 + 0.1 + 0.1 + 0.5 + 0.5) / 5)
    assert s["per_category"]["a"] == {"n": 2, "head_acc": 0.5, "text_acc": 0.5, "rouge_l": pytest.approx(0.3),
                                      "css": 0.25}
    assert s["per_category"]["b"]["head_acc"] == pytest.approx(2 / 3)
    assert s["per_category"]["b"]["text_acc"] == pytest.approx(2 / 3)
    flat = flat_metrics({"detection": s})
    assert flat["test/head_acc"] == pytest.approx(0.6) and flat["test/text_f1"] == pytest.approx(7 / 12)
    assert "test/head_auroc" in flat and "test/rouge_l" in flat


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)


#####################################################################################################
# end to end
#####################################################################################################


def _test_split_with_a_broken_file(corpus: Path) -> Path:  # noqa: F811
    """The corpus' detection test records plus one whose image file is empty (it must be skipped and counted)."""
    det = corpus / "detection"
    records = json.loads((det / "test.json").read_text())
    broken = dict(records[0], image="broken.png", id="broken")
    (det / "broken.png").write_bytes(b"")
    records = records[:5] + [broken] + records[5:]
    path = det / "test_with_broken.json"  # next to the images: their paths are relative to the json's folder
    path.write_text(json.dumps(records))
    return path


N_IMAGES, N_PROMPTS, PX, STEPS_GEN, MAX_NEW = 7, 4, 32, 2, 8


def eval_command(corpus: Path, root: Path, ckpt: Path, out: Path, weights: Path, *extra: str,  # noqa: F811
                 devices: int = 1) -> list[str]:
    """``python -m unigendet test`` of a checkpoint on the test splits, with a small evaluation."""
    test_json = _test_split_with_a_broken_file(corpus)
    cmd = fit_command(corpus, root, f"--data.test={test_json}", f"--data.gen.test={corpus / 't2i/test.jsonl'}",
                      f"--model.evaluation.max_images={N_IMAGES}", f"--model.evaluation.max_new_tokens={MAX_NEW}",
                      f"--model.evaluation.max_prompts={N_PROMPTS}", f"--model.evaluation.gen_px={PX}",
                      f"--model.evaluation.gen_steps={STEPS_GEN}", "--model.evaluation.batch_size=3",
                      f"--model.evaluation.inception_weights={weights}", "--model.evaluation.kid_subset_size=2",
                      f"--model.evaluation.out_dir={out}", *extra, devices=devices, workers=0)
    cmd[cmd.index("fit")] = "test"
    return [a for a in cmd if a != "--trainer.logger=false"] + [f"--ckpt_path={ckpt}"]


def test_unigendet_test_writes_the_protocol_report(corpus, inception_weights, tmp_path):  # noqa: F811
    from data_modules import CoEvolutionDataModule
    from unigendet.evaluation.fidelity import fidelity_metrics
    from unigendet.inference import UniGenDetPipeline

    root = tmp_path / "run"
    run(fit_command(corpus, root, "--trainer.max_steps=2"), tmp_path / "fit.log")
    ckpt = root / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    test_json = _test_split_with_a_broken_file(corpus)
    n_images, n_prompts, px, steps, max_new = N_IMAGES, N_PROMPTS, PX, STEPS_GEN, MAX_NEW
    cmd = eval_command(corpus, root, ckpt, tmp_path / "eval", inception_weights,
                       "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                       f"--trainer.logger.save_dir={tmp_path / 'logs'}")
    run(cmd, tmp_path / "test.log")

    out = tmp_path / "eval"
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    report = (out / "report.md").read_text()

    # --- detection: 7 records, the broken one skipped and counted, the other 6 delivered
    det = results["detection"]
    assert det["records"] == n_images and det["n"] == n_images - 1 and len(rows) == n_images - 1
    assert sum(det["skipped"].values()) == 1

    # an independent detection pass over the checkpoint's EMA weights, as the test data presents the images
    pipe = UniGenDetPipeline.from_pretrained(ckpt)
    dm = CoEvolutionDataModule(test=str(test_json), tokenizer=str(corpus / "tokenizer.json"), num_workers=0,
                               gen={"test": str(corpus / "t2i/test.jsonl"), "image_column": "image",
                                    "caption_column": "caption"})
    dm.connect(pipe.cfg)
    pipe.vit_tf, pipe.vae_tf = dm.vit_tf(), dm.vae_tf()
    records = {r.id: r for r in dm.split_records("test")}
    [broken] = [r.id for r in records.values() if r.image == "broken.png"]
    assert broken not in [r["id"] for r in rows]
    for row in rows:
        rec = records[row["id"]]
        [d] = pipe.detect([dm.record_image("test", rec)], prompt=rec.prompt, with_vae=True, max_new_tokens=max_new)
        assert row["p_fake"] == pytest.approx(d.p_fake, abs=1e-5)
        assert row["head"] == d.label and row["explanation"] == d.explanation
        assert row["reference"] == rec.answer and row["label"] == ("fake", "real")[rec.label]
        verdict = parse_label(d.explanation)
        assert row["text"] == (None if verdict is None else ("fake", "real")[verdict])
        assert row["rouge_l"] == pytest.approx(rouge_l(d.explanation, rec.answer), abs=1e-6)
        assert row["css"] == pytest.approx(css(rec.answer, d.explanation), abs=1e-9)
    head_acc = np.mean([r["head"] == r["label"] for r in rows])
    assert det["head"]["acc"] == pytest.approx(head_acc)
    assert det["rouge_l"] == pytest.approx(np.mean([r["rouge_l"] for r in rows]))

    # --- generation: PNGs reproduce from their seeds, FID recomputes from the files
    gen = results["generation"]
    assert gen["n"] == n_prompts and gen["seeds"] == list(range(n_prompts))
    from PIL import Image

    pngs = sorted((out / "generated").glob("*.png"))
    assert len(pngs) == n_prompts
    saved = [Image.open(p).convert("RGB") for p in pngs]
    again = pipe.generate(gen["prompts"][:2], height=px, width=px, steps=steps, seed=gen["seeds"][:2])
    for a, b in zip(again, saved[:2], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    t2i = dm.gen_dm
    real = [t2i.record_image("test", r) for r in t2i.split_records("test")[:n_prompts]]
    assert [r.prompt for r in t2i.split_records("test")[:n_prompts]] == gen["prompts"]
    expected = fidelity_metrics(real, saved, inception_weights, kid_subset_size=2)
    for key in ("fid", "kid_mean", "is_mean"):
        assert gen["fidelity"][key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6)
    p_fake = pipe.detect(saved, explain=False, with_vae=True)
    assert gen["p_fake_mean"] == pytest.approx(np.mean([d.p_fake for d in p_fake]), abs=1e-5)

    # --- the Markdown report, its figures and the logger
    assert "| head |" in report and "| explanation |" in report and "| FID |" in report
    for name in ("roc.png", "confusion_matrix.png", "per_category.png"):
        assert f"]({name})" in report, name  # a Markdown image link to the file next to report.md
        with Image.open(out / name) as fig:
            assert fig.format == "PNG" and min(fig.size) >= 200
    assert f"{100 * det['head']['acc']:.1f}" in report
    metrics_csv = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()
    header, values = metrics_csv[0].split(","), metrics_csv[-1].split(",")
    logged = {k: float(v) for k, v in zip(header, values, strict=True) if v}
    assert logged["test/head_acc"] == pytest.approx(det["head"]["acc"])
    assert logged["test/fid"] == pytest.approx(gen["fidelity"]["fid"], rel=1e-5)
    assert logged["test/rouge_l"] == pytest.approx(det["rouge_l"], rel=1e-5)
    shutil.rmtree(root / "ckpt")


@pytest.mark.multiprocess
@pytest.mark.slow  # three subprocess runs, ~95 s on 2 cores: `make test-all`
def test_two_sharded_processes_split_the_evaluation_and_agree_with_one(corpus, inception_weights, tmp_path):  # noqa: F811
    """Under FSDP2 each rank evaluates every other image with the full weights gathered (no collectives inside the
    forwards, so ranks may decode different lengths); the gathered report equals a single process's."""
    root = tmp_path / "run"
    run(fit_command(corpus, root, "--trainer.max_steps=2", devices=2, workers=0), tmp_path / "fit.log")
    ckpt = root / "ckpt" / "last.ckpt"
    assert ckpt.is_dir()  # a sharded checkpoint
    reports = {}
    for devices in (1, 2):
        extra = ("--trainer.strategy=fsdp2", "--model.fsdp.param_dtype=fp32") if devices == 1 else ()
        proc = run(eval_command(corpus, root, ckpt, tmp_path / f"eval{devices}", inception_weights, *extra,
                                devices=devices), tmp_path / f"test{devices}.log")
        if devices == 2:
            assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
        out = tmp_path / f"eval{devices}"
        reports[devices] = (json.loads((out / "results.json").read_text()),
                            [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()])
    (one, rows1), (two, rows2) = reports[1], reports[2]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [r["id"] for r in rows2] == [r["id"] for r in rows1] and len(rows1) == N_IMAGES - 1
    assert two["detection"]["skipped"] == one["detection"]["skipped"]
    for a, b in zip(rows1, rows2, strict=True):
        assert b["p_fake"] == pytest.approx(a["p_fake"], abs=1e-5)
        assert b["explanation"] == a["explanation"] and b["head"] == a["head"]
    g1, g2 = one["generation"], two["generation"]
    assert g2["prompts"] == g1["prompts"] and g2["seeds"] == g1["seeds"]
    assert g2["p_fake_mean"] == pytest.approx(g1["p_fake_mean"], abs=1e-5)
    assert g2["fidelity"]["fid"] == pytest.approx(g1["fidelity"]["fid"], rel=1e-3)


def test_missing_inception_weights_are_reported_not_fatal(tmp_path):
    from unigendet.evaluation.protocol import fidelity_or_reason

    out = fidelity_or_reason([], [], EvalConfig(inception_weights=str(tmp_path / "absent.pth")))
    assert "absent.pth" in out["not_computed"]
    text = markdown({"settings": {"split": "test", "gen_steps": None, "cfg_scale": None, "seed": 0},
                     "generation": {"n": 0, "px": 64, "skipped": {}, "fidelity": out}, "world_size": 1,
                     "seconds": 0.0})
    assert "not computed" in text and "absent.pth" in text


#####################################################################################################
# batch by batch: a stand-in engine and data, images counted while alive
#####################################################################################################


class Live:
    """Every decoded or generated image, weakly: how many are alive now (``alive``), and at most (``peak``)."""

    def __init__(self) -> None:
        self.alive, self.peak, self.made = 0, 0, 0

    def _gone(self, _ref) -> None:
        self.alive -= 1

    def new(self, seed: int, px: int = 24):
        import weakref

        from PIL import Image

        img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (px, px, 3), dtype=np.uint8))
        img._live_ref = weakref.ref(img, self._gone)  # kept by the image itself: fires when the image goes
        self.alive += 1
        self.made += 1
        self.peak = max(self.peak, self.alive)
        return img


class Side:
    """A data module side over ``records`` whose images are noise seeded by record (unreadable: ``broken`` ids)."""

    test = "test.json"
    caption_column = "caption"

    def __init__(self, records: list, live: Live, broken: tuple[str, ...] = (), gen_dm=None) -> None:
        self.records, self.live, self.broken = records, live, broken
        if gen_dm is not None:
            self.gen_dm, self.with_vae = gen_dm, True
            self.vit_tf = self.vae_tf = lambda: None

    @property
    def detection(self):  # the data contract (unigendet.training.data_contract): this side when it detects
        return self if hasattr(self, "with_vae") else None

    @property
    def text_to_image(self):
        return getattr(self, "gen_dm", None)

    def split_records(self, split: str) -> list:
        assert split == "test"
        return self.records

    def record_image(self, split: str, rec, skips=None):
        if rec.id in self.broken:
            skips.skip("unreadable_image", rec.id)
            return None
        return self.live.new(1000 + int(rec.id[1:]))


class Engine:
    """detect: p(fake) = mean brightness; generate: noise seeded by the seed. Batch sizes recorded."""

    def __init__(self, live: Live) -> None:
        from types import SimpleNamespace

        from unigendet.model.config import FlowConfig

        self.live, self.batches = live, []
        self.cfg = SimpleNamespace(flow=FlowConfig())  # the sampler defaults the saved PNGs record

    def detect(self, images, prompt="", with_vae=True, explain=True, max_new_tokens=0):
        from types import SimpleNamespace

        self.batches.append(("detect", len(images)))
        out = []
        for img in images:
            p = float(np.asarray(img).mean() / 255 - 0.5) * 8 + 0.5  # noise means spread around 0.5
            out.append(SimpleNamespace(p_fake=p, label="fake" if p >= 0.5 else "real",
                                       explanation=f"This is a {'fake' if p >= 0.5 else 'real'} image."))
        return out

    def generate(self, prompts, *, height, width, steps=None, cfg_scale=None, seed):
        self.batches.append(("generate", len(prompts)))
        return [self.live.new(s, px=height) for s in seed]


def small_features(extractor, images) -> dict:
    """Stand-in Inception features: 4 x 4 grey thumbnails (16 "pool" dims), their first 10 as logits."""
    import torch

    pool = torch.tensor(np.stack([np.asarray(img.convert("L").resize((4, 4)), np.float32).ravel() / 255
                                  for img in images]))
    return {"2048": pool, "logits_unbiased": 4 * pool[:, :10]}


def stand_in(live: Live, n: int = 9):
    from types import SimpleNamespace

    det = [SimpleNamespace(id=f"d{i}", prompt="Is it fake?" if i < 5 else "Real or not?", label=i % 2,
                           cate=("sd", "gan", "photo")[i % 3], answer="This is a fake image.") for i in range(n)]
    t2i = [SimpleNamespace(id=f"t{i}", prompt=f"caption {i}") for i in range(n)]
    gen = Side(t2i, live, broken=("t3",))
    return Side(det, live, gen_dm=gen), Engine(live)


@pytest.fixture
def stand_in_inception(monkeypatch):
    """The small stand-in features instead of Inception-v3 (and no weights file to check)."""
    import unigendet.evaluation.fidelity as fid
    import unigendet.evaluation.protocol as ev

    seen = []

    def features(extractor, images):
        seen.append(len(images))
        return small_features(extractor, images)

    monkeypatch.setattr(fid, "inception_features", features)
    monkeypatch.setattr(fid, "inception_weights", lambda path: path)
    monkeypatch.setattr(ev, "inception_or_reason", lambda cfg: ("stand-in extractor", None))
    return seen


def expected_generation(cfg: EvalConfig, n: int = 9) -> dict:
    """An independent pass: the readable captions in record order, their real and generated images' features."""
    from unigendet.evaluation.fidelity import metrics_from_features

    live = Live()
    dm, engine = stand_in(live, n)
    kept = [(i, r) for i, r in enumerate(dm.gen_dm.records) if r.id != "t3"]
    real = [dm.gen_dm.record_image("test", r) for _, r in kept]
    fake = engine.generate([r.prompt for _, r in kept], height=cfg.gen_px, width=cfg.gen_px,
                           seed=[cfg.seed + i for i, _ in kept])
    p_fake = [d.p_fake for d in engine.detect(fake)]
    return {"prompts": [r.prompt for _, r in kept], "seeds": [cfg.seed + i for i, _ in kept], "fake": fake,
            "p_fake_mean": sum(p_fake) / len(p_fake),
            "fidelity": metrics_from_features(small_features(None, fake), small_features(None, real),
                                              kid_subset_size=cfg.kid_subset_size)}


def test_protocol_holds_one_batch_of_images_not_all_of_them(stand_in_inception, tmp_path):
    """The old protocol decoded every record's image, generated every caption and kept them all (2 x 8 here); now a
    batch is read, judged / generated, saved and turned into features, and dropped before the next one."""
    from PIL import Image

    from unigendet.evaluation.protocol import run_protocol
    from unigendet.evaluation.report import write_report

    live = Live()
    dm, engine = stand_in(live)
    cfg = EvalConfig(batch_size=2, gen_px=16, seed=10, kid_subset_size=3, explain=True, out_dir=str(tmp_path / "eval"))
    results = run_protocol(engine, dm, cfg)
    assert live.made == 9 + 8 + 8  # detection images, readable real images, generated images
    assert live.peak <= cfg.batch_size + 1, live.peak  # one batch (+ the record read ahead to end a prompt's batch)
    assert max(n for _, n in engine.batches) <= cfg.batch_size and max(stand_in_inception) <= cfg.batch_size
    assert live.alive == 0  # nothing kept in the results

    exp = expected_generation(cfg)
    gen = results["generation"]
    assert gen["prompts"] == exp["prompts"] and gen["seeds"] == exp["seeds"] and gen["skipped"] == {
        "unreadable_image": 1}
    assert gen["fidelity"] == exp["fidelity"]  # paired, in record order
    assert gen["p_fake_mean"] == pytest.approx(exp["p_fake_mean"], abs=1e-12)
    det = results["detection"]
    assert det["n"] == 9 and [r["id"] for r in results["_rows"]] == [f"d{i}" for i in range(9)]

    # the PNGs were written as they were made, named by record index, prompt and seed in their text
    pngs = sorted((tmp_path / "eval" / "generated").glob("*.png"))
    assert [p.name for p in pngs] == gen["files"] == [f"{s - 10:05d}.png" for s in gen["seeds"]]
    for p, img, prompt, seed in zip(pngs, exp["fake"], gen["prompts"], gen["seeds"], strict=True):
        saved = Image.open(p)
        assert np.array_equal(np.asarray(saved), np.asarray(img))
        assert {k: saved.text[k] for k in ("prompt", "seed")} == {"prompt": prompt, "seed": str(seed)}
        settings = json.loads(saved.text["unigendet"])  # the sampler settings actually used, defaults filled in
        assert settings["seed"] == seed and settings["steps"] == 50 and settings["cfg_scale"] == 4.0
    out = write_report(results, tmp_path / "eval")
    report = (out / "report.md").read_text()
    for name in ("roc.png", "confusion_matrix.png", "per_category.png"):
        assert f"]({name})" in report and Image.open(out / name).format == "PNG"
    assert len(list((out / "generated").glob("*.png"))) == 8


def test_without_an_output_folder_the_pngs_wait_in_a_temporary_one(stand_in_inception, tmp_path):
    from unigendet.evaluation.protocol import run_protocol
    from unigendet.evaluation.report import write_report

    live = Live()
    dm, engine = stand_in(live, n=4)
    results = run_protocol(engine, dm, EvalConfig(batch_size=3, gen_px=16, detection=False))
    [spool] = map(Path, results["_png_dirs"])
    assert sorted(p.name for p in spool.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]  # t3 unreadable
    out = write_report(results, tmp_path / "report")
    assert sorted(p.name for p in (out / "generated").glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert not spool.exists()
    assert "roc.png" not in (out / "report.md").read_text()  # no detection, no detection figures


def _images_in(obj) -> int:
    from PIL import Image

    if isinstance(obj, Image.Image):
        return 1
    if isinstance(obj, dict):
        return sum(_images_in(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_images_in(v) for v in obj)
    return 0


def test_two_ranks_gather_features_not_images_and_agree_with_one(stand_in_inception, monkeypatch, tmp_path):
    """Two ranks as two threads (world / gather_per_rank stood in by a barrier): each takes every other record, only
    rows, p(fake), features and counts cross between them, and the results equal a single process's."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import unigendet.evaluation.protocol as ev

    local, barrier, slots, payloads = threading.local(), threading.Barrier(2, timeout=60), [None, None], []

    def gather(obj):
        slots[local.rank] = obj
        payloads.append(obj)
        barrier.wait()
        out = list(slots)
        barrier.wait()  # all have read before the next gather writes
        return out

    cfg = EvalConfig(batch_size=2, gen_px=16, seed=3, kid_subset_size=3, out_dir=str(tmp_path / "two"))
    one = ev.run_protocol(*reversed(stand_in(Live())), EvalConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "one")}))
    monkeypatch.setattr(ev, "world", lambda: (local.rank, 2))
    monkeypatch.setattr(ev, "gather_per_rank", gather)

    def rank(r: int):
        local.rank = r
        dm, engine = stand_in(Live())
        return ev.run_protocol(engine, dm, cfg), engine

    with ThreadPoolExecutor(2) as pool:
        (two, engine0), (two1, _) = [f.result() for f in [pool.submit(rank, r) for r in (0, 1)]]
    assert sum(n for kind, n in engine0.batches if kind == "generate") == 5  # records 0, 2, 4, 6, 8 (3 is rank 1's)
    assert payloads and sum(_images_in(p) for p in payloads) == 0
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["_rows"] == one["_rows"] == two1["_rows"]
    assert two["detection"] == one["detection"]
    for key in ("prompts", "seeds", "files", "skipped", "fidelity", "p_fake_mean", "judged_fake"):
        assert two["generation"][key] == one["generation"][key] == two1["generation"][key], key
    names = sorted(p.name for p in (tmp_path / "two" / "generated").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "one" / "generated").glob("*.png")) == two["generation"]["files"]


def test_a_figure_that_cannot_be_drawn_is_explained_in_the_report(tmp_path):
    from dataclasses import asdict

    from unigendet.evaluation.report import write_report

    rows = [{"index": i, "id": str(i), "cate": None, "label": "fake", "p_fake": p,
             "head": "fake" if p >= 0.5 else "real"} for i, p in enumerate([0.9, 0.3, 0.7])]
    (tmp_path / "roc.png").write_bytes(b"stale")  # from an earlier report: must not sit next to this one
    results = {"settings": asdict(EvalConfig()), "world_size": 1, "seconds": 0.0, "_rows": rows,
               "detection": {**summarize_detection(rows), "records": 3, "skipped": {}, "with_vae": True}}
    report = (write_report(results, tmp_path) / "report.md").read_text()
    assert "ROC curve of the real/fake head (fake = positive): not drawn (a ROC needs both labels, have 3 fake and " \
           "0 real images)." in report
    assert "Head accuracy per category: not drawn (no categories" in report
    assert "![Confusion matrix of the real/fake head](confusion_matrix.png)" in report
    assert (tmp_path / "confusion_matrix.png").is_file() and not (tmp_path / "roc.png").exists()
    assert not (tmp_path / "per_category.png").exists()


def test_generated_pngs_go_where_the_report_will_be(tmp_path):
    """out_dir, else cfg.out_dir, else the folder evaluate_module reports to (report_dir: the run's
    folder of the datamodule's trainer, <save_dir>/<name>/<version> of its logger, else
    <default_root_dir>/lightning_logs/<time>, + /eval), else a temporary folder; nothing without save_images."""
    from types import SimpleNamespace

    from unigendet.evaluation.protocol import _png_dir, report_dir

    class Trainer(SimpleNamespace):  # what unigendet.tracking.runs asks of a trainer 
        is_global_zero = True
        strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj)
        __hash__ = object.__hash__  # runs keys its cache by the trainer object

    logger = SimpleNamespace(save_dir=str(tmp_path / "logs"), name="proj", version="run1")
    trainer = Trainer(loggers=[logger], default_root_dir=str(tmp_path / "root"))
    dm = SimpleNamespace(trainer=trainer)
    assert _png_dir(dm, EvalConfig(out_dir=str(tmp_path / "cfg")), tmp_path / "arg") == tmp_path / "arg/generated"
    assert _png_dir(dm, EvalConfig(out_dir=str(tmp_path / "cfg")), None) == tmp_path / "cfg/generated"
    assert _png_dir(dm, EvalConfig(), None) == tmp_path / "logs/proj/run1/eval/generated"
    assert report_dir(EvalConfig(), trainer) == tmp_path / "logs/proj/run1/eval"
    dm = SimpleNamespace(trainer=Trainer(loggers=[], default_root_dir=str(tmp_path / "root")))
    png = _png_dir(dm, EvalConfig(), None)
    assert png.parent.parent.parent == tmp_path / "root/lightning_logs" and png.is_dir()
    assert png == report_dir(EvalConfig(), dm.trainer) / "generated"  # the same run folder, asked twice
    spool = _png_dir(SimpleNamespace(), EvalConfig(), None)
    assert spool.is_dir() and tmp_path not in spool.parents
    spool.rmdir()
    assert _png_dir(dm, EvalConfig(save_images=False, out_dir=str(tmp_path)), None) is None


def test_a_detection_split_without_readable_images_is_reported():
    text = markdown({"settings": {"split": "test"}, "detection": {"n": 0, "records": 2, "with_vae": True,
                                                                  "skipped": {"unreadable_image": 2}},
                     "world_size": 1, "seconds": 0.0})
    assert "no readable image among 2 records" in text and "unreadable_image" in text


def test_a_checkpoint_refuses_a_data_tokenizer_it_was_not_trained_with(corpus, tmp_path):  # noqa: F811
    """Two demo corpora (two seeds) train two different BPE vocabularies: scoring a checkpoint with the other one
    used to run and report a CE of 7.7 and garbled explanations; now it stops with what to pass instead."""
    root = tmp_path / "run"
    run(fit_command(corpus, root, "--trainer.max_steps=1"), tmp_path / "fit.log")
    other = json.loads((corpus / "tokenizer.json").read_text())
    vocab = other["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # two ordinary tokens swap ids: same size, other meaning
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok = tmp_path / "other_tokenizer.json"
    tok.write_text(json.dumps(other))
    cmd = eval_command(corpus, root, root / "ckpt" / "last.ckpt", tmp_path / "eval", tmp_path / "no-weights.pth",
                       f"--data.tokenizer={tok}", "--model.evaluation.generation=false")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "is not the one this checkpoint was trained with" in proc.stderr, proc.stderr[-2000:]
    # the training tokenizer itself passes the check (the same command runs to its report)
    run(eval_command(corpus, root, root / "ckpt" / "last.ckpt", tmp_path / "eval2", tmp_path / "no-weights.pth",
                     "--model.evaluation.generation=false"), tmp_path / "eval2.log")
    assert (tmp_path / "eval2" / "results.json").is_file()
