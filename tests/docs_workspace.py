"""The folder the documentation's commands run in (tests/test_docs.py): small data and model folders at the paths the
commands name, built by the test, so that the commands run as written.

* ``experiments/``: the repository's (a symlink);
* ``demo-run/corpus``: the embedded demo corpus, small variant (``unigendet demo-data --small``);
* ``demo-run/ae.safetensors``: the demo preset's autoencoder, trained on it for a few steps (``unigendet train-ae``);
* ``fakeclue/data_json/{train,test}.json`` + ``fakeclue/images``: the FakeClue layout, 16 records each (both labels,
  32 x 32 px) from the demo corpus's detection train / val records;
* ``laion/shards/*.parquet``: two Parquet shards with ``jpg`` (image bytes) and ``TEXT`` columns, 16 records;
* ``laion/tars/{00000..00001}.tar``: the same records as img2dataset tar shards (``key.jpg`` + ``.txt`` + ``.json``);
* ``laion_hf/train``: the same records as a Hugging Face ``save_to_disk`` folder (``jpg``, ``TEXT`` columns);
* ``fakeclue_hf/train`` (``save_to_disk``), ``fakeclue_hf.parquet`` (its Parquet export) and
  ``fakeclue_tars/{00000..00001}.tar`` (``key.jpg`` + ``key.json`` with label, cate, conversations): the FakeClue
  train records in the formats users hold them in;
* ``laion_heldout/test.jsonl``: the demo corpus's held-out text-to-image records;
* ``/models/BAGEL-7B-MoT`` -> ``<ws>/models/BAGEL-7B-MoT``: a BAGEL-format folder of a test-sized network (8 decoder
  layers of width 64, so the configs' DIGA layers exist; 512 px generation) with the corpus's tokenizer;
* ``UniGenDet-7B/``: the same kind of folder, other weights;
* ``photos/``, ``suspicious.png``: real crops of the corpus; one of its fakes;
* ``geneval_prompts.txt``: two GenEval prompts;
* ``weights/weights-inception-2015-12-05-6726825d.pth``: a network-free Inception-v3 file of torch-fidelity's
  architecture (tests/inception_file.py).

``/models/BAGEL-7B-MoT`` is the only text substituted in the commands (an absolute path the test cannot create);
every other path is created where the command looks for it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

from tests.conftest import REPO

MODEL_DIR = "/models/BAGEL-7B-MoT"
TEST_NET = {"mot": {"dim": 64, "n_layers": 8, "n_heads": 4, "n_kv_heads": 2, "mlp_dim": 128},
            "vit": {"dim": 32, "n_layers": 1, "n_heads": 2, "mlp_dim": 64},
            "flow": {"max_latent_size": 64, "sample_steps": 4},
            "head": {"diga_layer": 2}}
GENEVAL = ["a photo of a bench", "a photo of a cow and a bicycle"]


def model_folder(out: Path, tokenizer: Path, seed: int) -> Path:
    import torch

    from unigendet.checkpoint.folders import save_folder
    from unigendet.model.config import UniGenDetConfig
    from unigendet.model.unigendet import UniGenDet

    torch.manual_seed(seed)
    model = UniGenDet(UniGenDetConfig.from_name("demo", **TEST_NET))
    model.init_weights()
    save_folder(model, out, max_shard_bytes=2_000_000)
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


# the FakeClue / LAION stand-ins are few and small: the GDUF stacks pack up to 16,384 tokens a batch, and
# every record then fits in one pack of dense attention on the CPU
N_RECORDS, SIDE = 16, 32


def _small(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB").resize((SIDE, SIDE))


def fakeclue(det: Path, out: Path, splits: dict[str, str]) -> None:
    """FakeClue layout under ``out``: ``data_json/<split>.json`` with ``images/...`` paths, both labels."""
    (out / "data_json").mkdir(parents=True)
    for split, source in splits.items():
        records = json.loads((det / source).read_text())
        chosen = [r for r in records if r["label"] == 1][: N_RECORDS // 2] + \
                 [r for r in records if r["label"] == 0][: N_RECORDS // 2]
        for rec in chosen:
            (out / rec["image"]).parent.mkdir(parents=True, exist_ok=True)
            _small(det / rec["image"]).save(out / rec["image"])
        (out / "data_json" / f"{split}.json").write_text(json.dumps(chosen))


def laion_shards(t2i: Path, out: Path, n_shards: int = 2) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (t2i / "train.jsonl").read_text().splitlines()][:N_RECORDS]
    out.mkdir(parents=True)
    for k in range(n_shards):
        part = rows[k::n_shards]
        table = pa.table({"jpg": [_jpeg(t2i / r["image_path"]) for r in part], "TEXT": [r["prompt"] for r in part]})
        pq.write_table(table, out / f"{k:05d}.parquet")


def tar_shards(out: Path, samples: list[tuple[str, dict[str, bytes]]], n_shards: int = 2) -> None:
    """``samples`` (key, {field: bytes}) as WebDataset tar shards ``00000.tar``.. (members ``key.field``)."""
    from unigendet.inputs.tar_shards import write_shard

    out.mkdir(parents=True)
    for k in range(n_shards):
        write_shard(out / f"{k:05d}.tar", samples[k::n_shards])


def other_formats(ws: Path, t2i: Path) -> None:
    """The LAION and FakeClue records again as tar shards, saved HF datasets and a Parquet export."""
    import datasets

    datasets.disable_progress_bars()
    rows = [json.loads(line) for line in (t2i / "train.jsonl").read_text().splitlines()][:N_RECORDS]
    jpgs = [_jpeg(t2i / r["image_path"]) for r in rows]
    meta = [json.dumps({"caption": r["prompt"], "key": f"{i:09d}"}).encode() for i, r in enumerate(rows)]
    tar_shards(ws / "laion" / "tars", [(f"{i:09d}", {"jpg": jpgs[i], "txt": r["prompt"].encode(), "json": meta[i]})
                                       for i, r in enumerate(rows)])
    datasets.Dataset.from_dict({"jpg": jpgs, "TEXT": [r["prompt"] for r in rows]}).save_to_disk(
        str(ws / "laion_hf" / "train"))
    det = json.loads((ws / "fakeclue" / "data_json" / "train.json").read_text())
    images = [(ws / "fakeclue" / r["image"]).read_bytes() for r in det]
    text = datasets.Value("string")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["fake", "real"]),
                               "cate": text, "conversations": [{"from": text, "value": text}]})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images],
                                     "label": [r["label"] for r in det], "cate": [r["cate"] for r in det],
                                     "conversations": [r["conversations"] for r in det]}, features=feats)
    ds.save_to_disk(str(ws / "fakeclue_hf" / "train"))
    ds.to_parquet(str(ws / "fakeclue_hf.parquet"))
    tar_shards(ws / "fakeclue_tars", [(f"{i:06d}", {"jpg": _jpeg(ws / "fakeclue" / r["image"]), "json": json.dumps(
        {k: r[k] for k in ("label", "cate", "conversations")}).encode()}) for i, r in enumerate(det)])


def _jpeg(path: Path) -> bytes:
    buf = io.BytesIO()
    _small(path).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def build(ws: Path) -> Path:
    """Fill ``ws`` with everything the documented commands read."""
    from tests.inception_file import build_inception_weights
    from unigendet.demo.corpus import SMALL, build_demo_corpus
    from unigendet.training.autoencoder import train_from_corpus

    ws.mkdir(parents=True, exist_ok=True)
    (ws / "experiments").symlink_to(REPO / "experiments")
    corpus = ws / "demo-run" / "corpus"
    build_demo_corpus(corpus, seed=0, n_real=SMALL["n_real"], n_fake_per_family=SMALL["n_fake_per_family"])
    train_from_corpus(corpus, ws / "demo-run" / "ae.safetensors", steps=5, batch=4)
    det = corpus / "detection"
    fakeclue(det, ws / "fakeclue", {"train": "train.json", "test": "val.json"})
    laion_shards(corpus / "t2i", ws / "laion" / "shards")
    other_formats(ws, corpus / "t2i")
    (ws / "laion_heldout").mkdir()
    shutil.copyfile(corpus / "t2i" / "test.jsonl", ws / "laion_heldout" / "test.jsonl")
    shutil.copytree(corpus / "t2i" / "images", ws / "laion_heldout" / "images")
    model_folder(ws / MODEL_DIR.lstrip("/"), corpus / "tokenizer.json", seed=0)
    model_folder(ws / "UniGenDet-7B", corpus / "tokenizer.json", seed=1)
    records = json.loads((det / "test.json").read_text())
    (ws / "photos").mkdir()
    for rec in [r for r in records if r["label"] == 1][:2]:
        shutil.copyfile(det / rec["image"], ws / "photos" / Path(rec["image"]).name)
    fake = next(r for r in records if r["label"] == 0)
    shutil.copyfile(det / fake["image"], ws / "suspicious.png")
    (ws / "geneval_prompts.txt").write_text("\n".join(GENEVAL) + "\n")
    (ws / "weights").mkdir()
    build_inception_weights(ws / "weights" / "weights-inception-2015-12-05-6726825d.pth")
    (ws / "home").mkdir()
    return ws


def environment(ws: Path) -> dict[str, str]:
    """A user's shell: the venv first on PATH, no W&B credentials and no W&B mode set (base.yaml's logger goes offline
    by itself), W&B's files and the home folder inside the workspace."""
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", HOME=str(ws / "home"),
               NETRC=str(ws / "home" / "no-netrc"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               WANDB_CONFIG_DIR=str(ws / "home" / "wandb-config"), WANDB_CACHE_DIR=str(ws / "home" / "wandb-cache"),
               WANDB_DATA_DIR=str(ws / "home" / "wandb-data"))
    return env
