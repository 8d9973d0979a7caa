"""Tests of unigendet.model.packing: hand-checked packs with the tiny preset and the reference fixture's layout.

The expected lists in the hand-made cases are written out literally (worked out by hand from docs/method.md, "Packed
sequences"
and the fixture README's "Conventions"), not recomputed by a second packer.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import parity_fixture_dirs
from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import SamplePlan, TextSplit, VAESplit, ViTSplit, from_reference_batch, pack

FIXTURES = parity_fixture_dirs()
NO_FIXTURE = "no parity fixture: set UNIGENDET_PARITY_FIXTURES or provide ../shared/fixtures/parity_*"
BOS, EOS, VS, VE = 296, 297, 298, 299
INF = float("-inf")


@pytest.fixture(scope="module")
def cfg() -> UniGenDetConfig:
    return UniGenDetConfig.from_name("tiny")


def long(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def assert_long(actual: torch.Tensor, expected: list, name: str = "") -> None:
    assert actual.dtype == torch.long, name
    assert actual.tolist() == expected, name


#####################################################################################################
# A detection sample + a T2I sample, by hand
#####################################################################################################


@pytest.fixture(scope="module")
def two_samples():
    g = torch.Generator().manual_seed(0)
    vae_clean = torch.rand(3, 32, 48, generator=g) * 2 - 1  # 2 x 3 VAE tokens
    vit = torch.randn(3, 28, 42, generator=g)  # 2 x 3 ViT patches
    vae_noisy = torch.rand(3, 16, 32, generator=g) * 2 - 1  # 1 x 2 VAE tokens
    det = SamplePlan([VAESplit(image=vae_clean), ViTSplit(vit), TextSplit([10, 11, 12]),
                      TextSplit([20, 21, 22, 23], loss=True)], label=0, sample_id="det")
    t2i = SamplePlan([TextSplit([30, 31]), VAESplit(image=vae_noisy, noisy=True, timestep=0.3)], sample_id="t2i")
    return det, t2i, vae_clean, vit, vae_noisy


# token map of the hand case (35 tokens):
#   sample 0 (27): 0 VS | 1..6 VAE 2x3 | 7 VE | 8 VS | 9..14 ViT 2x3 | 15 VE | 16..20 text | 21..26 answer text
#   sample 1 (8):  27..30 caption | 31 VS | 32..33 noisy VAE 1x2 | 34 VE


def test_hand_pack_layout(cfg, two_samples):
    det, t2i, *_ = two_samples
    b = pack([det, t2i], cfg)
    assert b.sample_lens == [27, 8]
    assert b.seq_len == 35
    assert b.split_lens == [8, 8, 5, 6, 4, 4]
    assert b.split_modes == ["full", "full", "causal", "causal", "causal", "noise"]
    assert b.sample_ids == ["det", "t2i"]
    assert_long(b.position_ids, [0, 0, 0, 0, 0, 0, 0, 0,  # clean VAE: one position, then +1
                                 1, 1, 1, 1, 1, 1, 1, 1,  # ViT: one position, then +1
                                 2, 3, 4, 5, 6,  # text: +1 per token
                                 7, 8, 9, 10, 11, 12,
                                 0, 1, 2, 3,  # new sample restarts at 0
                                 4, 4, 4, 4])  # noisy VAE: one position, no advance


def test_hand_pack_text(cfg, two_samples):
    det, t2i, *_ = two_samples
    b = pack([det, t2i], cfg)
    assert_long(b.text_ids, [VS, VE, VS, VE, BOS, 10, 11, 12, EOS, BOS, 20, 21, 22, 23, EOS,
                             BOS, 30, 31, EOS, VS, VE], "text_ids")
    assert_long(b.text_indexes, [0, 7, 8, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
                                 27, 28, 29, 30, 31, 34], "text_indexes")
    assert_long(b.ce_indexes, [21, 22, 23, 24, 25], "ce_indexes")
    assert_long(b.ce_labels, [20, 21, 22, 23, EOS], "ce_labels")
    assert_long(b.det_indexes, [21], "det_indexes")
    assert_long(b.det_labels, [0], "det_labels")


def test_hand_pack_vit(cfg, two_samples):
    det, t2i, _, vit, _ = two_samples
    b = pack([det, t2i], cfg)
    assert_long(b.vit_indexes, [9, 10, 11, 12, 13, 14], "vit_indexes")
    assert_long(b.vit_position_ids, [0, 1, 2, 16, 17, 18], "vit_position_ids")
    assert_long(b.vit_seqlens, [6], "vit_seqlens")
    assert b.vit_tokens.shape == (6, 14 * 14 * 3)
    # patch (row 1, col 2) is token 1 * 3 + 2 = 5; element (p, q, c) sits at (p * 14 + q) * 3 + c
    patch = b.vit_tokens[5]
    for p in range(14):
        for q in range(14):
            for c in range(3):
                assert patch[(p * 14 + q) * 3 + c] == vit[c, 14 + p, 28 + q], (p, q, c)
    assert b.vit_tokens[0, 0] == vit[0, 0, 0]
    assert b.vit_tokens[0, 1] == vit[1, 0, 0]  # channel fastest
    assert b.vit_tokens[0, 3] == vit[0, 0, 1]  # then q (column inside the patch)
    assert b.vit_tokens[0, 42] == vit[0, 1, 0]  # then p (row inside the patch)
    assert b.vit_tokens[1, 0] == vit[0, 0, 14]  # next patch along the row


def test_hand_pack_vae(cfg, two_samples):
    det, t2i, vae_clean, _, vae_noisy = two_samples
    b = pack([det, t2i], cfg)
    assert_long(b.vae_indexes, [1, 2, 3, 4, 5, 6, 32, 33], "vae_indexes")
    assert_long(b.vae_position_ids, [0, 1, 2, 16, 17, 18, 0, 1], "vae_position_ids")
    assert b.vae_timesteps.dtype == torch.float32
    assert torch.equal(b.vae_timesteps, torch.tensor([INF] * 6 + [0.3, 0.3], dtype=torch.float32))
    assert_long(b.vae_grids, [[2, 3], [1, 2]], "vae_grids")
    assert_long(b.mse_indexes, [32, 33], "mse_indexes")
    assert b.n_vae_tokens == 8
    assert b.padded_latent is None
    assert len(b.vae_images) == 2
    assert torch.equal(b.vae_images[0], vae_clean) and torch.equal(b.vae_images[1], vae_noisy)


def test_hand_pack_covers_every_token_once(cfg, two_samples):
    det, t2i, *_ = two_samples
    b = pack([det, t2i], cfg)
    every = torch.cat([b.text_indexes, b.vit_indexes, b.vae_indexes]).sort().values
    assert torch.equal(every, torch.arange(35))


def test_sample_order_shifts_indexes(cfg, two_samples):
    det, t2i, *_ = two_samples
    b = pack([t2i, det], cfg)  # the 8-token T2I sample first
    assert b.sample_lens == [8, 27]
    assert_long(b.mse_indexes, [5, 6])
    assert_long(b.det_indexes, [8 + 21])
    assert_long(b.ce_indexes, [29, 30, 31, 32, 33])
    assert_long(b.vae_indexes, [5, 6, 9, 10, 11, 12, 13, 14])
    assert_long(b.position_ids[:10], [0, 1, 2, 3, 4, 4, 4, 4, 0, 0])


def test_det_index_is_first_loss_text(cfg):
    plan = SamplePlan([ViTSplit(torch.zeros(3, 14, 14)), TextSplit([5], loss=True), TextSplit([6, 7], loss=True)],
                      label=1)
    b = pack([plan], cfg)
    # 0 VS, 1 patch, 2 VE, 3..5 first answer, 6..9 second
    assert_long(b.det_indexes, [3])
    assert_long(b.det_labels, [1])
    assert_long(b.ce_indexes, [3, 4, 6, 7, 8])
    assert_long(b.ce_labels, [5, EOS, 6, 7, EOS])


#####################################################################################################
# Latents instead of images
#####################################################################################################


def test_latent_inputs_are_padded(cfg):
    g = torch.Generator().manual_seed(1)
    lat_a = torch.randn(16, 4, 6, generator=g)  # 2 x 3 tokens
    lat_b = torch.randn(16, 2, 8, generator=g)  # 1 x 4 tokens
    plans = [SamplePlan([VAESplit(latent=lat_a), TextSplit([1], loss=True)], label=1),
             SamplePlan([TextSplit([2]), VAESplit(latent=lat_b, noisy=True, timestep=-0.5)])]
    b = pack(plans, cfg)
    assert b.vae_images is None
    assert b.padded_latent.shape == (2, 16, 4, 8)
    assert torch.equal(b.padded_latent[0, :, :4, :6], lat_a)
    assert torch.equal(b.padded_latent[0, :, :, 6:], torch.zeros(16, 4, 2))
    assert torch.equal(b.padded_latent[1, :, :2, :8], lat_b)
    assert torch.equal(b.padded_latent[1, :, 2:, :], torch.zeros(16, 2, 8))
    assert_long(b.vae_grids, [[2, 3], [1, 4]])
    # sample 0: 0 VS, 1..6, 7 VE, 8..10 text; sample 1: 11..13 text, 14 VS, 15..18, 19 VE
    assert_long(b.vae_indexes, [1, 2, 3, 4, 5, 6, 15, 16, 17, 18])
    assert_long(b.vae_position_ids, [0, 1, 2, 16, 17, 18, 0, 1, 2, 3])
    assert torch.equal(b.vae_timesteps, torch.tensor([INF] * 6 + [-0.5] * 4))
    assert_long(b.mse_indexes, [15, 16, 17, 18])
    assert_long(b.position_ids, [0] * 8 + [1, 2, 3] + [0, 1, 2] + [3] * 6)


#####################################################################################################
# Untimed noisy splits
#####################################################################################################


def test_untimed_noisy_timestep_from_generator(cfg):
    plans = [SamplePlan([TextSplit([1]), VAESplit(latent=torch.zeros(16, 2, 4), noisy=True)]),
             SamplePlan([TextSplit([2]), VAESplit(latent=torch.zeros(16, 4, 2), noisy=True)])]
    state = torch.get_rng_state()
    a = pack(plans, cfg, generator=torch.Generator().manual_seed(7)).vae_timesteps
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be used when a generator is given"
    b = pack(plans, cfg, generator=torch.Generator().manual_seed(7)).vae_timesteps
    c = pack(plans, cfg, generator=torch.Generator().manual_seed(8)).vae_timesteps
    assert a.shape == (4,)
    assert torch.isfinite(a).all()
    assert a[0] == a[1] and a[2] == a[3], "one timestep per image"
    assert a[0] != a[2], "each image draws its own timestep"
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # without a generator: the global RNG, so torch.manual_seed makes it reproducible
    torch.manual_seed(3)
    d = pack(plans, cfg).vae_timesteps
    torch.manual_seed(3)
    assert torch.equal(pack(plans, cfg).vae_timesteps, d)


def test_given_zero_timestep_is_kept(cfg):
    plan = SamplePlan([TextSplit([1]), VAESplit(latent=torch.zeros(16, 2, 2), noisy=True, timestep=0.0)])
    for seed in (0, 1):
        b = pack([plan], cfg, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(b.vae_timesteps, torch.tensor([0.0]))


def test_text_only_batch_has_empty_image_fields(cfg):
    b = pack([SamplePlan([TextSplit([4, 5], loss=True)])], cfg)
    assert_long(b.text_ids, [BOS, 4, 5, EOS])
    assert_long(b.position_ids, [0, 1, 2, 3])
    assert b.vit_tokens.shape == (0, 14 * 14 * 3)
    assert b.vit_indexes.numel() == b.vit_position_ids.numel() == b.vit_seqlens.numel() == 0
    assert b.vae_indexes.numel() == b.vae_position_ids.numel() == b.vae_timesteps.numel() == 0
    assert b.vae_grids.shape == (0, 2)
    assert b.padded_latent is None and b.vae_images is None
    assert b.det_indexes.numel() == 0, "no label: not a detection sample"


#####################################################################################################
# Errors
#####################################################################################################


def test_label_without_loss_text(cfg):
    plan = SamplePlan([ViTSplit(torch.zeros(3, 14, 14)), TextSplit([1, 2])], label=0)
    with pytest.raises(ValueError, match="loss"):
        pack([plan], cfg)


def test_label_must_be_binary(cfg):
    plan = SamplePlan([ViTSplit(torch.zeros(3, 14, 14)), TextSplit([1, 2], loss=True)], label=2)
    with pytest.raises(ValueError, match="label"):
        pack([plan], cfg)


@pytest.mark.parametrize("split", [
    ViTSplit(torch.zeros(3, 28, 30)),
    ViTSplit(torch.zeros(3, 20, 28)),
    VAESplit(image=torch.zeros(3, 16, 24)),
    VAESplit(latent=torch.zeros(16, 3, 2)),
], ids=["vit-width", "vit-height", "vae-image", "vae-latent"])
def test_input_not_a_multiple_of_the_patch(cfg, split):
    with pytest.raises(ValueError, match="multiple"):
        pack([SamplePlan([TextSplit([1]), split])], cfg)


def test_mixed_image_and_latent_vae_inputs(cfg):
    plans = [SamplePlan([VAESplit(image=torch.zeros(3, 16, 16)), TextSplit([1], loss=True)], label=0),
             SamplePlan([TextSplit([1]), VAESplit(latent=torch.zeros(16, 2, 2), noisy=True, timestep=0.0)])]
    with pytest.raises(ValueError, match="mix"):
        pack(plans, cfg)


def test_empty_plan_list(cfg):
    with pytest.raises(ValueError, match="empty"):
        pack([], cfg)


def test_vae_split_needs_exactly_one_input():
    with pytest.raises(ValueError):
        VAESplit()
    with pytest.raises(ValueError):
        VAESplit(image=torch.zeros(3, 16, 16), latent=torch.zeros(16, 2, 2))


@pytest.mark.parametrize("split", [
    ViTSplit(torch.zeros(3, 14, 14 * 17)),
    VAESplit(image=torch.zeros(3, 16 * 17, 16)),
    VAESplit(latent=torch.zeros(16, 2, 2 * 17)),
], ids=["vit", "vae-image", "vae-latent"])
def test_grid_larger_than_position_table(cfg, split):
    with pytest.raises(ValueError, match="exceeds"):
        pack([SamplePlan([TextSplit([1]), split])], cfg)


def test_largest_grid_that_fits(cfg):
    b = pack([SamplePlan([TextSplit([1]), VAESplit(latent=torch.zeros(16, 32, 2))])], cfg)
    assert b.vae_position_ids[-1].item() == 15 * 16  # row 15, col 0


#####################################################################################################
# The reference fixture
#####################################################################################################


def _load(folder):
    return load_file(folder / "batch.safetensors"), json.loads((folder / "batch.json").read_text())


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURE)
@pytest.mark.parametrize("folder", FIXTURES, ids=[p.name for p in FIXTURES])
def test_from_reference_batch_det_indexes(folder):
    tensors, meta = _load(folder)
    b = from_reference_batch(tensors, meta)
    assert_long(b.det_indexes, meta["det_token_indexes"])
    assert_long(b.det_labels, meta["label"])
    assert b.sample_lens == meta["sample_lens"]
    assert b.split_lens == [n for lens in meta["split_lens"] for n in lens]
    assert b.split_modes == [m for modes in meta["attn_modes"] for m in modes]
    assert_long(b.vae_grids, meta["patchified_vae_latent_shapes"])
    derived = from_reference_batch(tensors, {k: v for k, v in meta.items() if k != "det_token_indexes"})
    assert_long(derived.det_indexes, meta["det_token_indexes"])


def _unpatchify(rows: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """(h * w, p * p * C) rows in (h, w, p, q, c) order -> (C, h * p, w * p) image."""
    x = rows.reshape(h, w, patch, patch, -1)  # (h, w, p, q, c)
    return x.permute(4, 0, 2, 1, 3).reshape(x.shape[-1], h * patch, w * patch)


def _plans_from_fixture(tensors, meta) -> list[SamplePlan]:
    patch = meta["config"]["vit_patch_size"]
    vit_rows, vit_cursor, vae_image = tensors["packed_vit_tokens"], 0, 0
    plans = []
    for sample in meta["samples"]:
        splits = []
        for s in sample["splits"]:
            if s["type"] == "text":
                splits.append(TextSplit(list(s["text_ids"]), loss=bool(s["loss"])))
            elif s["type"] == "vit_image":
                h, w = s["grid_hw"]
                rows = vit_rows[vit_cursor:vit_cursor + h * w]
                vit_cursor += h * w
                splits.append(ViTSplit(_unpatchify(rows, h, w, patch)))
            elif s["type"] == "vae_image":
                h, w = s["grid_hw"]
                latent = tensors["padded_latent"][vae_image, :, : 2 * h, : 2 * w].clone()
                vae_image += 1
                noisy = s["attn_mode"] == "noise"
                splits.append(VAESplit(latent=latent, noisy=noisy, timestep=s["timestep_raw"] if noisy else None))
            else:
                raise AssertionError(f"unknown split type {s['type']}")
        plans.append(SamplePlan(splits, label=sample.get("label"), sample_id=sample["name"]))
    assert vit_cursor == vit_rows.shape[0]
    return plans


def _fixture_config(folder) -> UniGenDetConfig:
    bagel = json.loads((folder / "bagel_config.json").read_text())
    llm = json.loads((folder / "llm_config.json").read_text())
    meta = json.loads((folder / "batch.json").read_text())
    ids = bagel["special_token_ids"]
    side = bagel["vit_max_num_patch_per_side"]
    patch = meta["config"]["vit_patch_size"]
    return UniGenDetConfig.from_name(
        "tiny",
        tokens={"bos": ids["bos_token_id"], "eos": ids["eos_token_id"], "vision_start": ids["start_of_image"],
                "vision_end": ids["end_of_image"]},
        vit={"patch_size": patch, "image_size": patch * side, "max_patches_per_side": side},
        flow={"max_latent_size": bagel["max_latent_size"], "latent_patch_size": bagel["latent_patch_size"]},
        mot={"vocab_size": llm["vocab_size"]},
    )


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURE)
@pytest.mark.parametrize("folder", FIXTURES, ids=[p.name for p in FIXTURES])
def test_repack_fixture_samples_reproduces_reference_layout(folder):
    tensors, meta = _load(folder)
    b = pack(_plans_from_fixture(tensors, meta), _fixture_config(folder))
    assert b.sample_lens == meta["sample_lens"]
    assert b.split_lens == [n for lens in meta["split_lens"] for n in lens]
    assert b.split_modes == [m for modes in meta["attn_modes"] for m in modes]
    assert_long(b.vae_grids, meta["patchified_vae_latent_shapes"], "vae_grids")
    pairs = {
        "packed_text_ids": b.text_ids,
        "packed_text_indexes": b.text_indexes,
        "packed_position_ids": b.position_ids,
        "packed_vit_token_indexes": b.vit_indexes,
        "packed_vit_position_ids": b.vit_position_ids,
        "vit_token_seqlens": b.vit_seqlens,
        "packed_vae_token_indexes": b.vae_indexes,
        "packed_latent_position_ids": b.vae_position_ids,
        "mse_loss_indexes": b.mse_indexes,
        "ce_loss_indexes": b.ce_indexes,
        "packed_label_ids": b.ce_labels,
        "label": b.det_labels,
    }
    for key, ours in pairs.items():
        assert_long(ours, tensors[key].long().tolist(), key)
    assert torch.equal(b.vit_tokens, tensors["packed_vit_tokens"]), "packed_vit_tokens"
    assert torch.equal(b.vae_timesteps, tensors["packed_timesteps"]), "packed_timesteps"
    assert_long(b.det_indexes, meta["det_token_indexes"], "det_indexes")
    # the re-packed latents agree with the fixture's inside each image's region (its padding is random)
    for i, (h, w) in enumerate(meta["patchified_vae_latent_shapes"]):
        region = (slice(None), slice(0, 2 * h), slice(0, 2 * w))
        assert torch.equal(b.padded_latent[i][region], tensors["padded_latent"][i][region]), f"latent {i}"
