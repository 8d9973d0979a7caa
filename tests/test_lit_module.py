"""The co-evolution LightningModule with a real Trainer on CPU: stage configs, which side each update trains, DIGA,
fresh fakes, GDUF's single update, NaN policy, checkpoint resume, and the experiment YAMLs through LightningCLI."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import REPO
from unigendet.training.optim import partition

EXPERIMENTS = REPO / "experiments"
# the demo preset shrunk to test size; it matches the demo corpus (tokenizer, 8 px patches and latent tokens)
SMALL = {"mot": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_dim": 128},
         "vit": {"dim": 32, "n_layers": 1, "n_heads": 2, "mlp_dim": 64}, "head": {"diga_layer": 1}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from unigendet.demo.corpus import SMALL as SMALL_CORPUS
    from unigendet.demo.corpus import build_demo_corpus

    out = tmp_path_factory.mktemp("demo_corpus")
    build_demo_corpus(out, seed=0, **{k: v for k, v in SMALL_CORPUS.items() if k in ("n_real", "n_fake_per_family")})
    return out


def data_args(corpus: Path, teacher: bool = False, **kw) -> dict:
    args = dict(train=str(corpus / "detection/train.json"), val=str(corpus / "detection/val.json"),
                tokenizer=str(corpus / "tokenizer.json"), token_budget=900, num_workers=0, packs_per_epoch=4,
                gen={"train": str(corpus / "t2i/train.jsonl"), "val": str(corpus / "t2i/val.jsonl"),
                     "token_budget": 400, "teacher": teacher})
    args.update(kw)
    return args


def make(corpus, *, teacher=False, data=None, **model_kw):
    from data_modules import CoEvolutionDataModule
    from unigendet.training.module import LitUniGenDet, Stage
    from unigendet.training.optim import OptimConfig

    sched = model_kw.pop("stage", {})
    optim = model_kw.pop("optim", {})
    lit = LitUniGenDet(model_name="demo", model_overrides=SMALL, stage=Stage(**sched),
                       optim=OptimConfig(**{"lr_det": 1e-3, "lr_gen": 1e-3, "warmup_steps": 0, **optim}),
                       **model_kw)
    dm = CoEvolutionDataModule(**data_args(corpus, teacher=teacher, **(data or {})))
    return lit, dm


def trainer(tmp_path, steps, **kw):
    args = dict(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0, default_root_dir=tmp_path)
    args.update(kw)
    return L.Trainer(**args)


def snapshot(lit):
    return {n: p.detach().clone() for n, p in lit.model.named_parameters()}


def changed(before, lit):
    """Names of parameters whose values moved (NaN compares equal to NaN)."""
    return {n for n, p in lit.model.named_parameters()
            if not torch.allclose(before[n], p.detach(), rtol=0, atol=0, equal_nan=True)}


#####################################################################################################
# Which side each update trains
#####################################################################################################


@pytest.mark.parametrize("which", ["det", "gen"])
def test_each_update_changes_only_its_side(corpus, tmp_path, which):
    lit, dm = make(corpus, stage={"train_det": which == "det", "train_gen": which == "gen"}, ema_decay=None)
    lit.configure_model()
    before = snapshot(lit)
    sides = {side: {n for n, _ in params} for side, params in partition(lit.model, "det").items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, 2).fit(lit, datamodule=dm)
    moved = changed(before, lit)
    assert moved and moved <= sides[which], sorted(moved - sides[which])[:5]
    assert len(moved) > 0.8 * len(sides[which])  # (almost) every parameter of the side moved
    # the frozen side's LR schedule is not stepped without its optimiser (torch's scheduler-order warning)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    frozen = "gen" if which == "det" else "det"
    assert lit.lr_schedulers()[0 if frozen == "det" else 1].last_epoch == 0
    assert lit.lr_schedulers()[0 if which == "det" else 1].last_epoch == 2


def test_alternating_step_counts_training_steps_and_trains_both_sides(corpus, tmp_path):
    lit, dm = make(corpus)
    lit.configure_model()
    before = snapshot(lit)
    tr = trainer(tmp_path, 3)
    tr.fit(lit, datamodule=dm)
    assert tr.global_step == 3 and lit.counters["batches"] == 3  # not 6: two optimisers, one step each
    sides = {side: {n for n, _ in params} for side, params in partition(lit.model, "det").items()}
    moved = changed(before, lit)
    assert moved & sides["det"] and moved & sides["gen"]


def test_update_ratio(corpus, tmp_path):
    lit, dm = make(corpus, stage={"gen_every": 2})
    lit.configure_model()
    tr = trainer(tmp_path, 4)
    tr.fit(lit, datamodule=dm)
    assert tr.global_step == 4
    assert lit.lr_schedulers()[1].last_epoch == 4  # schedules advance once per training step


#####################################################################################################
# GDUF: one update of all parameters on the weighted sum
#####################################################################################################


class SeedEachBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1234)


def test_joint_gduf_is_one_adamw_update_of_the_weighted_sum(corpus, tmp_path):
    from unigendet.training.optim import param_groups

    lit, dm = make(corpus, stage={"joint": True}, optim={"schedule": "constant", "clip_det": 1.0,
                                                            "weight_decay": 0.01}, ema_decay=None)
    lit.configure_model()
    reference = copy.deepcopy(lit.model)
    dm.connect(lit.cfg)
    first = next(iter(dm.train_dataloader()))
    trainer(tmp_path, 1, callbacks=[SeedEachBatch()]).fit(lit, datamodule=dm)

    # the same step by hand: one AdamW over every trainable parameter, global clipping, same noise
    reference.train()
    named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(named, 0.01), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    torch.manual_seed(1234)
    out_d = reference(first["det"])
    out_g = reference(first["gen"])
    loss = (out_d["ce"].mean() + 0.2 * torch.nn.functional.cross_entropy(out_d["det_logits"], first["det"].det_labels)
            + out_g["mse"].mean(-1).mean())
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
    opt.step()
    for (n, p), q in zip(named, [dict(lit.model.named_parameters())[n] for n, _ in named], strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


#####################################################################################################
# DIGA, fresh fakes, NaN
#####################################################################################################


def test_diga_trains_the_generator_against_a_frozen_teacher(corpus, tmp_path):
    lit, dm = make(corpus, teacher=True, stage={"train_det": False, "diga": True})
    lit.configure_model()
    teacher_before = {n: p.clone() for n, p in lit.teacher.named_parameters()}
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(trainer.callback_metrics["train/loss_diga"].item())

    trainer(tmp_path, 2, callbacks=[Spy()]).fit(lit, datamodule=dm)
    assert len(seen) == 2 and all(0.0 <= v <= 2.0 for v in seen)
    assert all(p.grad is None and not p.requires_grad for p in lit.teacher.parameters())
    assert all(torch.equal(teacher_before[n], p) for n, p in lit.teacher.named_parameters())
    assert lit.model.diga_proj.mlp.fc1.weight.grad is not None  # the projector did train


def test_fresh_fakes_enter_the_detection_update(corpus, tmp_path):
    lit, dm = make(corpus, stage={"fresh_fakes_every": 1, "fresh_fakes": 2, "fresh_fake_px": 32,
                                     "fresh_fake_steps": 2})
    trainer(tmp_path, 3).fit(lit, datamodule=dm)
    assert lit.counters["fresh_fakes_seen"] == 4  # made at steps 1 and 2, consumed by the next detection update


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nan_loss_policy(corpus, tmp_path, policy):
    lit, dm = make(corpus, stage={"on_nan": policy}, ema_decay=None)
    lit.configure_model()
    with torch.no_grad():
        lit.model.llm2vae.weight[0, 0] = float("nan")  # poisons the flow loss only
    before = snapshot(lit)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="loss_mse.*step 0"):
            trainer(tmp_path, 1).fit(lit, datamodule=dm)
        return
    trainer(tmp_path, 2).fit(lit, datamodule=dm)
    assert lit.counters["skipped_nan"] == 2
    sides = {side: {n for n, _ in params} for side, params in partition(lit.model, "det").items()}
    assert not (changed(before, lit) & sides["gen"])  # the generation updates were skipped...
    assert changed(before, lit) & sides["det"]  # ...the detection updates were not


#####################################################################################################
# Checkpoints
#####################################################################################################


def test_checkpoint_resume_continues_the_step_count_and_exports(corpus, tmp_path, capsys):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from unigendet.cli import main
    from unigendet.inference import UniGenDetPipeline

    lit, dm = make(corpus)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_last=True)
    trainer(tmp_path, 2, enable_checkpointing=True, callbacks=[ck]).fit(lit, datamodule=dm)
    last = tmp_path / "ck" / "last.ckpt"
    assert last.exists()
    lit2, dm2 = make(corpus)
    tr = trainer(tmp_path, 4)
    tr.fit(lit2, datamodule=dm2, ckpt_path=last)
    assert tr.global_step == 4 and lit2.counters["batches"] == 4
    # the training checkpoint is usable for inference (EMA weights) and exports to the BAGEL format
    pipe = UniGenDetPipeline.from_pretrained(last)
    ema = lit.ema.shadow
    assert torch.equal(dict(pipe.model.named_parameters())["det_head.fc2.weight"], ema["det_head.fc2.weight"])
    assert 0.0 <= pipe.detect([pipe_image()], explain=False)[0].p_fake <= 1.0
    assert main(["export", "--ckpt", str(last), "--out", str(tmp_path / "export")]) == 0
    exported = UniGenDetPipeline.from_pretrained(tmp_path / "export").cfg.to_dict()
    assert {**exported, "name": None} == {**pipe.cfg.to_dict(), "name": None}


def test_predict_gives_p_fake_for_every_held_out_sample(corpus, tmp_path):
    lit, dm = make(corpus, data={"test": str(corpus / "detection/test.json")})
    preds = [p for batch in trainer(tmp_path, 1).predict(lit, datamodule=dm) for p in batch]
    import json

    n_test = len(json.loads((corpus / "detection/test.json").read_text()))
    assert len(preds) == n_test and len({p["id"] for p in preds}) == n_test
    assert all(0.0 <= p["p_fake"] <= 1.0 and p["label"] in (0, 1) for p in preds)


def test_validation_reports_detection_metrics(corpus, tmp_path):
    lit, dm = make(corpus)
    tr = trainer(tmp_path, 2, limit_val_batches=3, val_check_interval=2)
    tr.fit(lit, datamodule=dm)
    metrics = tr.callback_metrics
    assert 0.0 <= metrics["val/acc"] <= 1.0 and 0.0 <= metrics["val/f1"] <= 1.0 and metrics["val/loss_mse"] > 0


def test_sampling_for_callbacks_leaves_the_training_random_stream_alone(corpus, tmp_path):
    """ImageSamples and ForensicExplanations generate and detect at every validation; a detection forward draws flow
    noise even for clean latents, which used to shift every later training step's noise (the demo's numbers moved
    when its sample grid started to report p(fake))."""
    lit, dm = make(corpus)
    trainer(tmp_path, 1).fit(lit, datamodule=dm)
    before = torch.get_rng_state()
    images = lit.generate_images(["a caption", "another caption"], height=32, width=32, steps=2, use_ema=True)
    p_fake = lit.detect_images(images, use_ema=True)
    assert p_fake.shape == (2,) and torch.equal(before, torch.get_rng_state())


def test_fresh_fakes_without_the_data_contract_say_what_is_missing():
    """A data module without the TrainingData contract (a plain LightningDataModule) cannot supply captions."""
    from unigendet.training.fresh_fakes import FreshFakes

    with pytest.raises(TypeError, match="TrainingData"):
        FreshFakes().draw(lambda *a, **k: [], None, 1, n=1, px=32, steps=2)


def pipe_image():
    from PIL import Image

    return Image.new("RGB", (64, 48), (120, 30, 200))


#####################################################################################################
# Every experiment YAML parses and trains a step through LightningCLI
#####################################################################################################

STACKS = {
    "debug.yaml": ["base.yaml", "debug.yaml"],
    "demo.yaml": ["demo.yaml"],
    "gduf.yaml": ["base.yaml", "gduf.yaml"],
    "diga.yaml": ["base.yaml", "gduf.yaml", "diga.yaml"],
    "coevolve.yaml": ["base.yaml", "gduf.yaml", "coevolve.yaml"],
    "ablations/wo_smsa.yaml": ["base.yaml", "gduf.yaml", "ablations/wo_smsa.yaml"],
    "ablations/wo_diga.yaml": ["base.yaml", "gduf.yaml", "coevolve.yaml", "ablations/wo_diga.yaml"],
    "ablations/diga_layer4.yaml": ["base.yaml", "gduf.yaml", "diga.yaml", "ablations/diga_layer4.yaml"],
    "ablations/head_weight1.yaml": ["base.yaml", "gduf.yaml", "ablations/head_weight1.yaml"],
}


def test_diga_layer_beyond_the_model_is_a_clear_error(corpus):
    lit, _ = make(corpus, teacher=True, stage={"diga": True, "diga_layer": 8})
    with pytest.raises(ValueError, match="diga_layer 8"):
        lit.configure_model()


def test_every_experiment_yaml_is_covered():
    found = {str(p.relative_to(EXPERIMENTS)) for p in EXPERIMENTS.rglob("*.yaml")
             if not {"sweeps", "slurm"} & set(p.parts)}  # stacked on top of an experiment, tested on their own
    assert found - {"base.yaml"} == set(STACKS)


@pytest.mark.parametrize("name", sorted(STACKS))
def test_experiment_stack_keeps_every_key_its_files_set(name, capsys):
    """The merged config of each documented stack holds every key each of its files set (and no later file
    replaced), with that file's value: nothing an earlier file set is dropped by a later one. The main stacks also
    train through the CLI as the README runs them (tests/test_docs.py)."""
    from tests.test_docs import expected_values, stack_differences
    from unigendet.cli import main

    words = [f"--config={EXPERIMENTS / c}" for c in STACKS[name]]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *words, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    merged = yaml.safe_load(capsys.readouterr().out)
    expected = expected_values(words, REPO)
    assert any(key.startswith(("model.", "data.")) for key in expected)
    assert not (diffs := stack_differences(expected, merged)), "\n".join(diffs)
