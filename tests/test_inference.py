"""Inference: KV caches change nothing but speed, the head agrees with training, the CLI speaks JSON, export
round-trips.

The tests build their own small random-weight checkpoint (tiny preset + a BPE tokenizer trained here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, SHARED
from unigendet.checkpoint.folders import save_folder
from unigendet.cli import main
from unigendet.constants import DETECTION_PROMPT
from unigendet.inference import UniGenDetPipeline
from unigendet.inputs.tokenizer import train_bpe
from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import SamplePlan, TextSplit, VAESplit, ViTSplit, pack
from unigendet.model.unigendet import UniGenDet

REAL_FAKE = SHARED / "fixtures" / "real_world" / "gpt_image_2_fake.png"
GENEVAL = SHARED / "fixtures" / "real_world" / "geneval_prompts.txt"
TEXTS = ["This is a fake image. The fur looks painted and the edges repeat.", "This is a real image.",
         DETECTION_PROMPT, "a photo of a cat", "a red bench in the park"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    cfg = UniGenDetConfig.from_name("tiny")
    torch.manual_seed(0)
    model = UniGenDet(cfg)
    model.init_weights()
    with torch.no_grad():  # random heads too: zero-initialised ones would make every check trivially equal
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_folder(model, out)
    train_bpe(TEXTS * 4, out / "tokenizer.json", vocab_size=cfg.mot.vocab_size, min_frequency=1)
    return out


@pytest.fixture(scope="module")
def pipe(ckpt):
    return UniGenDetPipeline.from_pretrained(ckpt)


def _images(sizes=((60, 90), (120, 80), (40, 40))):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


#####################################################################################################
# Detection
#####################################################################################################


@pytest.mark.parametrize("with_vae", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cached_decoding_equals_recomputation(pipe, with_vae, temperature):
    kw = dict(max_new_tokens=10, with_vae=with_vae, temperature=temperature, seed=3, return_logits=True)
    cached = pipe.detect(_images(), **kw)
    full = pipe.detect(_images(), use_cache=False, **kw)
    for a, b in zip(cached, full, strict=True):
        assert a.tokens == b.tokens and len(a.tokens) == 10
        assert a.p_fake == pytest.approx(b.p_fake, abs=1e-6)
        diff = max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))
        assert diff < 1e-5


def test_head_p_fake_equals_the_training_forward(pipe):
    """p(fake) read at the answer's <|im_start|> before any answer token equals the training forward's detection
    logits on the same image and prompt, whatever the answer that follows (causal attention)."""
    images = _images()
    results = pipe.detect(images, explain=False)
    prompt = pipe.tok.encode(DETECTION_PROMPT)
    plans = [SamplePlan([VAESplit(image=pipe.vae_tf(im)), ViTSplit(pipe.vit_tf(im)), TextSplit(prompt),
                         TextSplit(pipe.tok.encode("This is a fake image."), loss=True)], label=0) for im in images]
    with torch.no_grad():
        out = pipe.model(pack(plans, pipe.cfg))
    p_train = torch.softmax(out["det_logits"], -1)[:, 0]
    assert [r.p_fake for r in results] == pytest.approx(p_train.tolist(), abs=1e-5)
    assert {r.label for r in results} <= {"fake", "real"}
    assert all((r.label == "fake") == (r.p_fake >= 0.5) for r in results)


def test_batched_detection_equals_one_by_one(pipe):
    images = _images()
    together = pipe.detect(images, max_new_tokens=6)
    alone = [pipe.detect([im], max_new_tokens=6)[0] for im in images]
    for a, b in zip(together, alone, strict=True):
        assert a.tokens == b.tokens and a.p_fake == pytest.approx(b.p_fake, abs=1e-5)


#####################################################################################################
# Generation
#####################################################################################################


@pytest.mark.parametrize("cfg_scale,interval,renorm", [(1.0, (0.0, 1.0), 0.0), (3.0, (0.2, 0.9), 0.5)])
def test_cached_context_equals_full_recomputation(pipe, cfg_scale, interval, renorm):
    kw = dict(height=48, width=64, steps=5, shift=3.0, cfg_scale=cfg_scale, cfg_interval=interval,
              renorm_min=renorm, seed=7)
    prompts = ["a photo of a cat", "a red bench in the park"]
    cached, grid = pipe.generate_latents(prompts, **kw)
    full, _ = pipe.generate_latents(prompts, use_cache=False, **kw)
    assert grid == (3, 4) and cached.shape == (2, 12, pipe.cfg.latent_token_dim)
    assert torch.allclose(cached, full, atol=1e-5)
    noise = torch.randn(12, pipe.cfg.latent_token_dim, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(cached[0], noise)  # the sampler moved


def test_an_image_does_not_depend_on_its_batch(pipe):
    kw = dict(height=32, width=48, steps=4, cfg_scale=2.0)
    batch, _ = pipe.generate_latents(["a photo of a cat", "a red bench in the park"], seed=[11, 12], **kw)
    alone, _ = pipe.generate_latents(["a red bench in the park"], seed=[12], **kw)
    assert torch.allclose(batch[1], alone[0], atol=1e-5)


def test_generate_returns_images_of_the_requested_size(pipe):
    images = pipe.generate(["a photo of a cat"], height=32, width=48, steps=3)
    assert images[0].size == (48, 32) and images[0].mode == "RGB"
    with pytest.raises(ValueError, match="multiples"):
        pipe.generate(["x"], height=30, width=48, steps=2)


#####################################################################################################
# Command line and export
#####################################################################################################


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_cli_detect_reports_every_file(ckpt, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(_images()):
        im.save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    Image.new("RGB", (4, 4)).save(folder / "tiny.png")
    inputs = [str(folder)] + ([str(REAL_FAKE)] if REAL_FAKE.exists() else [])
    assert main(["detect", *inputs, "--ckpt", str(ckpt), "--max-new-tokens", "5", "--batch-size", "2"]) == 0
    rows = _lines(capsys.readouterr().out)
    assert len(rows) == 5 + len(inputs) - 1
    bad = [r for r in rows if "error" in r]
    assert bad == [{"path": str(folder / "broken.jpg"), "error": "unreadable_image"},
                   {"path": str(folder / "tiny.png"), "error": "image_too_small"}]
    for r in rows:
        if "error" not in r:
            assert 0.0 <= r["p_fake"] <= 1.0 and r["label"] in ("fake", "real") and isinstance(r["explanation"], str)
    assert main(["detect", str(folder / "0.png"), "--ckpt", str(ckpt), "--no-explain"]) == 0
    (row,) = _lines(capsys.readouterr().out)
    assert row["explanation"] is None


@pytest.mark.skipif(not REAL_FAKE.exists(), reason="../shared/fixtures/real_world is not present")
def test_detect_handles_the_large_real_world_fake(pipe):
    img = Image.open(REAL_FAKE)
    assert img.size == (800, 1200)
    (r,) = pipe.detect([img], max_new_tokens=3)
    # the preset's transforms bring it inside the position tables, aspect ratio kept to within one stride
    vit = pipe.vit_tf(img.convert("RGB"))
    assert vit.shape[1] % 14 == 0 and vit.shape[2] % 14 == 0 and vit.shape[1] > vit.shape[2]
    assert 0.0 <= r.p_fake <= 1.0 and len(r.tokens) == 3


def test_cli_generate_writes_pngs_with_prompt_and_seed(ckpt, tmp_path, capsys):
    prompts = GENEVAL.read_text().splitlines()[:3] if GENEVAL.exists() else ["a photo of a bench", "a cow", "x"]
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "gen"
    assert main(["generate", "--ckpt", str(ckpt), "--prompts-file", str(pfile), "--prompt", "a red bench",
                 "--out", str(out), "--height", "32", "--width", "32", "--steps", "3", "--seed", "5",
                 "--batch-size", "2"]) == 0
    rows = _lines(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["a red bench", *prompts]
    for i, r in enumerate(rows):
        img = Image.open(r["path"])
        assert img.size == (32, 32)
        assert img.text["prompt"] == r["prompt"] and img.text["seed"] == str(5 + i)
        assert json.loads(img.text["unigendet"])["steps"] == 3


def test_export_round_trip_is_exact(ckpt, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--single-file"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "ema.safetensors" in report["files"] and "tokenizer.json" in report["tokenizer"]
    a, b = UniGenDetPipeline.from_pretrained(ckpt), UniGenDetPipeline.from_pretrained(out)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.tok.encode(TEXTS[0]) == b.tok.encode(TEXTS[0])
    ra, rb = a.detect(_images()[:1], max_new_tokens=4), b.detect(_images()[:1], max_new_tokens=4)
    assert ra[0].tokens == rb[0].tokens and ra[0].p_fake == rb[0].p_fake


def test_generate_records_the_settings_actually_used(ckpt, tmp_path, capsys):
    """Without --steps / --cfg-scale the PNG says which the model's defaults were, not null."""
    out = tmp_path / "gen"
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "a cow", "--out", str(out), "--height", "32",
                 "--width", "32"]) == 0
    (row,) = _lines(capsys.readouterr().out)
    meta = json.loads(Image.open(row["path"]).text["unigendet"])
    flow = UniGenDetConfig.from_name("tiny").flow
    assert meta["steps"] == flow.sample_steps and meta["cfg_scale"] == flow.cfg_scale
    assert meta["shift"] == flow.sample_shift and meta["cfg_interval"] == list(flow.cfg_interval)
    assert meta["dtype"] == "float32" and meta["seed"] == 0


def test_exported_weights_are_readable_by_everyone(ckpt, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exp"), "--no-progress"]) == 0
    finally:
        os.umask(old)
    files = list((tmp_path / "exp").iterdir())
    assert any(p.suffix == ".safetensors" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def test_inference_defaults_fit_the_hardware():
    from unigendet.cli import resolve_device

    if torch.cuda.is_available():
        assert resolve_device(None, None) == ("cuda", "bfloat16")
    else:
        assert resolve_device(None, None) == ("cpu", "float32")
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available on this machine"):
            resolve_device("cuda", None)
    assert resolve_device("cpu", "bf16") == ("cpu", "bfloat16")
    with pytest.raises(ValueError, match="not a device torch knows"):
        resolve_device("gpu0", None)


@pytest.mark.parametrize("argv, message", [
    (["detect", "{img}", "--ckpt", "{ckpt}", "--device", "cuda"], "--device cuda: CUDA is not available"),
    (["detect", "{tmp}/missing.png", "--ckpt", "{ckpt}"], "none of the inputs exist"),
    (["detect", "{img}", "--ckpt", "{tmp}/no-model"], "--ckpt {tmp}/no-model: no such file or folder"),
    (["detect", "{img}", "--ckpt", "{ckpt}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["generate", "--ckpt", "{ckpt}", "--out", "{tmp}/o"], "give --prompt and/or --prompts-file"),
    (["generate", "--ckpt", "{ckpt}", "--out", "{tmp}/o", "--prompt", "x", "--device", "cuda:3"], "--device cuda:3"),
    (["export", "--ckpt", "{tmp}/no-model", "--out", "{tmp}/o"], "--ckpt {tmp}/no-model: no such file or folder"),
])
def test_bad_inference_arguments_fail_in_one_line_before_any_weights_are_read(ckpt, tmp_path, capsys, argv, message):
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    img = tmp_path / "one.png"
    _images()[0].save(img)
    fill = {"img": str(img), "ckpt": str(ckpt), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"unigendet {argv[0]}: error: "), err
    assert message.format(**fill) in err[0]
    assert "loaded" not in captured.err and captured.out == ""


def test_console_script_detect_outputs_json(ckpt, tmp_path):
    path = tmp_path / "one.png"
    _images()[0].save(path)
    proc = subprocess.run([sys.executable, "-m", "unigendet", "detect", str(path), "--ckpt", str(ckpt),
                           "--max-new-tokens", "3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = _lines(proc.stdout)
    assert row["path"] == str(path) and "p_fake" in row


@pytest.mark.slow
@pytest.mark.skipif(not GENEVAL.exists(), reason="../shared/fixtures/real_world is not present")
def test_all_geneval_prompts_generate(pipe):
    prompts = GENEVAL.read_text().splitlines()
    assert len(prompts) == 553
    images = []
    for i in range(0, len(prompts), 64):
        images += pipe.generate(prompts[i: i + 64], height=32, width=32, steps=2, seed=i)
    assert len(images) == 553 and all(im.size == (32, 32) for im in images)
