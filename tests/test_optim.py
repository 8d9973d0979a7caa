"""Parameter partition, AdamW groups, learning-rate schedules and one-sided optimiser steps."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from tests.conftest import mixed_plans
from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import pack
from unigendet.model.unigendet import UniGenDet, reduce_losses
from unigendet.training.optim import (
    SIDES,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    effective_warmup,
    lr_lambda,
    param_groups,
    partition,
)

FROZEN_PREFIXES = ("vae.", "vit_pos_embed.", "latent_pos_embed.", "latent_to_vit_connector.")


@pytest.fixture(scope="module")
def tiny_cfg():
    return UniGenDetConfig.from_name("tiny")


@pytest.fixture
def model(tiny_cfg):
    model = UniGenDet(tiny_cfg)
    model.init_weights()
    return model


def _names(side):
    return [n for n, _ in side]


#####################################################################################################
# Config
#####################################################################################################


@pytest.mark.parametrize("kwargs", [
    {"lr_det": 0.0}, {"lr_gen": -1e-4}, {"lr_det": math.nan}, {"weight_decay": -0.1}, {"betas": (0.9, 1.0)},
    {"betas": (0.9,)}, {"eps": 0.0}, {"warmup_steps": -1}, {"warmup_steps": 1.5}, {"schedule": "step"},
    {"min_lr_ratio": 1.5}, {"clip_det": 0.0}, {"clip_gen": -1.0}, {"shared": "both"},
])
def test_bad_configs_fail_at_construction(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        OptimConfig(**kwargs)


def test_config_per_side_accessors_and_list_betas():
    cfg = OptimConfig(lr_det=1e-3, lr_gen=2e-4, clip_det=None, clip_gen=0.5, betas=[0.8, 0.9])
    assert (cfg.lr("det"), cfg.lr("gen"), cfg.clip("det"), cfg.clip("gen")) == (1e-3, 2e-4, None, 0.5)
    assert cfg.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="side"):
        cfg.lr("und")


#####################################################################################################
# Partition
#####################################################################################################


@pytest.mark.parametrize("shared", ["det", "gen"])
def test_every_trainable_parameter_is_in_exactly_one_side(model, shared):
    sides = partition(model, shared=shared)
    assert set(sides) == set(SIDES)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    placed = _names(sides["det"]) + _names(sides["gen"])
    assert sorted(placed) == sorted(trainable)  # each once: no duplicates, nothing missing
    assert {"embed.weight", "lm_head.weight"} <= set(_names(sides[shared]))
    other = "gen" if shared == "det" else "det"
    assert not {"embed.weight", "lm_head.weight"} & set(_names(sides[other]))
    params = {n: p for n, p in model.named_parameters()}
    assert all(p is params[n] for n, p in sides["det"] + sides["gen"])


def test_frozen_shared_is_in_neither_side(model):
    sides = partition(model, shared="frozen")
    placed = set(_names(sides["det"]) + _names(sides["gen"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - placed == {"embed.weight", "lm_head.weight"}


def test_experts_and_modules_go_to_their_side(model):
    sides = partition(model)
    det, gen = _names(sides["det"]), _names(sides["gen"])
    assert any(".und." in n for n in det) and not any(".und." in n for n in gen)
    assert any(".gen." in n for n in gen) and not any(".gen." in n for n in det)
    assert all(n.startswith(("decoder.layers.", "decoder.norm_und.", "vit.", "connector.", "det_head.",
                             "embed.", "lm_head.")) for n in det)
    assert all(n.startswith(("decoder.layers.", "decoder.norm_gen.", "vae2llm.", "llm2vae.", "time_embed.",
                             "diga_proj.")) for n in gen)
    for prefix in ("decoder.norm_und.", "vit.blocks.", "connector.", "det_head."):
        assert any(n.startswith(prefix) for n in det), prefix
    for prefix in ("decoder.norm_gen.", "vae2llm.", "llm2vae.", "time_embed.", "diga_proj."):
        assert any(n.startswith(prefix) for n in gen), prefix
    assert "decoder.layers.1.und.mlp.down.weight" in det and "decoder.layers.1.gen.mlp.down.weight" in gen


def test_frozen_parts_never_appear(model):
    assert model.latent_to_vit_connector is not None  # the tiny preset has it, so the check below means something
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(FROZEN_PREFIXES) for n in frozen)
    for shared in ("det", "gen", "frozen"):
        sides = partition(model, shared=shared)
        placed = _names(sides["det"]) + _names(sides["gen"])
        assert not [n for n in placed if n.startswith(FROZEN_PREFIXES)]


def test_a_new_trainable_module_raises_naming_it(model):
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"extra\.weight.*extra\.bias"):
        partition(model)
    model.extra.requires_grad_(False)  # frozen, it is simply left out
    assert "extra.weight" not in _names(partition(model)["det"] + partition(model)["gen"])


@pytest.mark.parametrize("part", ["vae", "vit_pos_embed", "latent_pos_embed", "latent_to_vit_connector"])
def test_unfreezing_a_frozen_part_raises(model, part):
    getattr(model, part).requires_grad_(True)
    with pytest.raises(ValueError, match=rf"\['{part}\."):
        partition(model)


def test_bad_shared_owner_raises(model):
    with pytest.raises(ValueError, match="shared"):
        partition(model, shared="und")


@pytest.mark.parametrize("wrapper", ["_orig_mod", "_checkpoint_wrapped_module"])
def test_wrapped_model_is_partitioned_by_its_plain_names(model, wrapper):
    outer = nn.Module()  # the names torch.compile / checkpoint_wrapper give, without paying for either
    setattr(outer, wrapper, model)
    sides, plain = partition(outer), partition(model)
    for side in SIDES:
        assert [n.removeprefix(wrapper + ".") for n in _names(sides[side])] == _names(plain[side])


#####################################################################################################
# Parameter groups
#####################################################################################################


def test_weight_decay_only_on_matrices(model):
    named = partition(model)["det"] + partition(model)["gen"]
    groups = param_groups(named, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed = {id(p) for p in groups[0]["params"]}
    params = dict(model.named_parameters())
    for name in ("decoder.layers.0.und.wq.weight", "decoder.layers.0.gen.mlp.up.weight", "vit.patch_embed.weight",
                 "lm_head.weight", "det_head.fc1.weight"):
        assert id(params[name]) in decayed, name
    for name in ("decoder.layers.0.und.wq.bias", "decoder.layers.0.gen.attn_norm.weight", "decoder.norm_und.weight",
                 "vit.blocks.0.norm1.bias", "det_head.norm.weight", "embed.weight", "vit.pos_embed.weight"):
        assert id(params[name]) not in decayed, name
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(named)


def test_param_groups_drop_empty_groups_and_refuse_duplicates():
    lin = nn.Linear(3, 3, bias=False)
    assert [g["weight_decay"] for g in param_groups([("w", lin.weight)], 0.05)] == [0.05]
    with pytest.raises(ValueError, match="twice"):
        param_groups([("w", lin.weight), ("w2", lin.weight)], 0.05)
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer([], 1e-3, OptimConfig())


def test_build_optimizer_uses_the_config():
    lin = nn.Linear(3, 3)
    cfg = OptimConfig(weight_decay=0.01, betas=(0.8, 0.9), eps=1e-6)
    opt = build_optimizer(lin.named_parameters(), 3e-4, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [
        (3e-4, (0.8, 0.9), 1e-6, 0.01), (3e-4, (0.8, 0.9), 1e-6, 0.0)]


#####################################################################################################
# Schedules
#####################################################################################################


def _multipliers(cfg, total, steps):
    f = lr_lambda(cfg, total)
    return [f(s) for s in steps]


def test_warmup_ramp_then_constant():
    cfg = OptimConfig(warmup_steps=4, schedule="constant")
    got = _multipliers(cfg, 20, [0, 1, 3, 4, 10, 20, 50])
    assert got == pytest.approx([1 / 5, 2 / 5, 4 / 5, 1.0, 1.0, 1.0, 1.0])


def test_cosine_decay_to_min_ratio():
    cfg = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    # decay over steps 4..20 (16 steps): halfway at 12, a quarter at 8
    got = _multipliers(cfg, 20, [0, 3, 4, 8, 12, 20, 25])
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    assert got == pytest.approx([1 / 5, 4 / 5, 1.0, quarter, 0.55, 0.1, 0.1])


def test_linear_decay_to_min_ratio_without_warmup():
    cfg = OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.2)
    got = _multipliers(cfg, 10, [0, 5, 9, 10, 11])
    assert got == pytest.approx([1.0, 0.6, 0.28, 0.2, 0.2])


def test_warmup_is_capped_at_half_the_run(caplog):
    with caplog.at_level(logging.WARNING, logger="unigendet.training.optim"):
        assert effective_warmup(2000, 1000) == 500
    assert any(r.name == "unigendet.training.optim" and r.levelno == logging.WARNING and "2000" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unigendet.training.optim"):
        assert effective_warmup(500, 1000) == 500
        assert effective_warmup(0, 1) == 0
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="unigendet.training.optim"):
        f = lr_lambda(OptimConfig(warmup_steps=2000, schedule="linear", min_lr_ratio=0.0), 1000)
    assert caplog.records
    assert [f(0), f(499), f(500), f(750), f(1000)] == pytest.approx([1 / 501, 500 / 501, 1.0, 0.5, 0.0])


@pytest.mark.parametrize("total", [0, -5])
def test_non_positive_total_steps_raise(total):
    with pytest.raises(ValueError, match="total_steps"):
        effective_warmup(0, total)
    with pytest.raises(ValueError, match="total_steps"):
        lr_lambda(OptimConfig(), total)


def test_scheduler_drives_every_group():
    lin = nn.Linear(2, 2)
    cfg = OptimConfig(weight_decay=0.1, warmup_steps=2, schedule="linear", min_lr_ratio=0.5)
    opt = build_optimizer(lin.named_parameters(), 1e-2, cfg)
    sched = build_scheduler(opt, cfg, total_steps=6)
    seen = []
    for _ in range(7):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    expected = [1 / 3, 2 / 3, 1.0, 0.875, 0.75, 0.625, 0.5]
    assert seen == [pytest.approx([1e-2 * m] * 2) for m in expected]


#####################################################################################################
# A real optimisation step
#####################################################################################################


@pytest.mark.parametrize("side", SIDES)
def test_one_sided_step_moves_only_that_side(tiny_cfg, side):
    torch.manual_seed(0)
    model = UniGenDet(tiny_cfg)
    model.init_weights()
    with torch.no_grad():  # break the zero-init heads so that gradients reach both sides
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    sides = partition(model, shared=side)
    opt = build_optimizer(sides[side], 1e-2, OptimConfig(weight_decay=0.1))
    batch = pack(mixed_plans(tiny_cfg, with_latents=True), tiny_cfg)
    out = model(batch)
    losses = reduce_losses(out, batch)
    (losses["loss_ce"] + losses["loss_mse"] + losses["loss_det"]).backward()
    other = "gen" if side == "det" else "det"

    def has_grad(p):
        return p.grad is not None and p.grad.abs().sum() > 0

    assert any(has_grad(p) for _, p in sides[other])  # the loss touches the other side too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    mine = set(_names(sides[side]))
    assert moved <= mine
    # a non-zero gradient moves a parameter, and so does weight decay (>=2-D, any gradient); AdamW skips grad=None
    assert moved == {n for n, p in sides[side] if has_grad(p) or (p.grad is not None and p.ndim >= 2)}
    assert {"embed.weight", "lm_head.weight"} <= moved
