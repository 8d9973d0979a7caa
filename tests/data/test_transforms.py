"""ViT / VAE image transforms: stride multiples, bounds, aspect ratio, exact normalisation, preset defaults."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.inputs.skips import SkipCounter
from unigendet.inputs.transforms import ImageTooSmall, ImageTransform, vae_transform, vit_transform
from unigendet.model.config import UniGenDetConfig

SIZES = [1, 7, 8, 13, 50, 100, 223, 224, 225, 511, 640, 980, 981, 1023, 1500, 4000, 12000]


def _fits_one_scale(tf: ImageTransform, w: int, h: int, out_w: int, out_h: int) -> bool:
    """Some single scale s puts both output sides within one stride of the scaled input sides."""
    st = tf.stride
    lo = max((out_w - st) / w, (out_h - st) / h)
    hi = min((out_w + st) / w, (out_h + st) / h)
    return lo <= hi + 1e-9


@pytest.mark.parametrize("tf", [
    ImageTransform(stride=14, min_side=224, max_side=980, max_pixels=980 * 980),
    ImageTransform(stride=16, min_side=512, max_side=1024, max_pixels=1024 * 1024),
    ImageTransform(stride=16, min_side=100, max_side=1000, max_pixels=300_000),  # bounds not stride multiples
    ImageTransform(stride=8, min_side=32, max_side=128, max_pixels=128 * 128),
], ids=["vit-bagel", "vae-bagel", "odd-bounds", "demo"])
def test_target_size_is_stride_aligned_bounded_and_keeps_the_aspect_ratio(tf):
    cap = tf.max_side // tf.stride * tf.stride
    for w, h in itertools.product(SIZES, SIZES):
        out_w, out_h = tf.target_size(w, h)
        assert out_w % tf.stride == 0 and out_h % tf.stride == 0 and min(out_w, out_h) >= tf.stride
        assert max(out_w, out_h) <= cap and out_w * out_h <= tf.max_pixels, (w, h, out_w, out_h)
        assert _fits_one_scale(tf, w, h, out_w, out_h), (w, h, out_w, out_h)
        # the short side reaches min_side whenever the upper bounds leave room for it
        s = max(1.0, tf.min_side / min(w, h))
        room = max(w, h) * s <= cap - tf.stride and w * h * s * s <= tf.max_pixels / 4
        if room:
            assert min(out_w, out_h) >= tf.min_side, (w, h, out_w, out_h)


def test_sizes_inside_the_bounds_are_kept_and_conflicts_favour_max_side():
    tf = ImageTransform(stride=14, min_side=224, max_side=980, max_pixels=980 * 980)
    assert tf.target_size(448, 700) == (448, 700)  # native resolution, already stride multiples
    assert tf.target_size(100, 50) == (448, 224)  # upscaled so the short side reaches 224
    out_w, out_h = tf.target_size(50, 2000)  # 1:40 strip: min_side would need 8960 px of long side
    assert out_h == 980 and out_w == 28  # 980 / 40 = 24.5 -> nearest stride multiple


def test_tensor_shape_dtype_and_exact_normalisation_on_constant_images():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tf = ImageTransform(stride=14, min_side=28, max_side=98, max_pixels=98 * 98, mean=mean, std=std)
    for value in (0, 37, 128, 255):
        x = tf(Image.new("RGB", (60, 35), (value, value, value)))
        assert x.dtype == torch.float32 and x.shape == (3, 28, 56)  # target_size(60, 35) = (56, 28)
        for c in range(3):
            expected = (value / 255 - mean[c]) / std[c]
            assert torch.allclose(x[c], torch.full_like(x[c], expected), atol=1e-6), (value, c)
    assert tf.target_size(60, 35) == (56, 28)


def test_vae_transform_maps_pixels_to_minus_one_one():
    cfg = UniGenDetConfig.from_name("demo")
    tf = vae_transform(cfg)
    black, white = tf(Image.new("RGB", (64, 64))), tf(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert (black == -1).all() and (white == 1).all()
    noisy = tf(Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)))
    assert noisy.min() >= -1 - 1e-6 and noisy.max() <= 1 + 1e-6
    assert tuple(noisy.shape[1:]) == tuple(reversed(tf.target_size(70, 50)))


def test_preset_defaults():
    bagel = UniGenDetConfig.from_name("bagel-7b-mot")
    vit, vae = vit_transform(bagel), vae_transform(bagel)
    assert (vit.stride, vit.min_side, vit.max_side, vit.mean, vit.std) == (14, 224, 980, bagel.vit.mean, bagel.vit.std)
    assert (vae.stride, vae.min_side, vae.max_side, vae.mean, vae.std) == (16, 512, 1024, (0.5,) * 3, (0.5,) * 3)
    demo = UniGenDetConfig.from_name("demo")
    vit, vae = vit_transform(demo), vae_transform(demo)
    assert (vit.stride, vit.max_side, vae.stride, vae.max_side) == (4, 64, 8, 64)
    assert vit.min_side % 4 == 0 and vae.min_side == 32
    custom = vit_transform(bagel, min_side=28, max_side=140, max_pixels=140 * 70)
    assert (custom.min_side, custom.max_side, custom.max_pixels) == (28, 140, 9800)
    # the ViT output never exceeds the position table: max_patches_per_side patches a side
    for size in [(3000, 2000), (224, 5000)]:
        assert max(vit_transform(bagel).target_size(*size)) // 14 <= bagel.vit.max_patches_per_side


def test_images_below_the_absolute_minimum_are_skipped():
    tf = vit_transform(UniGenDetConfig.from_name("demo"))
    skips = SkipCounter()
    assert tf.apply(Image.new("RGB", (7, 300)), skips, "strip") is None
    assert tf.apply(Image.new("RGB", (8, 8)), skips, "ok") is not None
    assert dict(skips.counts) == {"image_too_small": 1} and skips.examples["image_too_small"] == "strip"
    with pytest.raises(ImageTooSmall):
        tf(Image.new("RGB", (3, 3)))


def test_non_rgb_input_and_antialiased_downscale():
    tf = ImageTransform(stride=8, min_side=8, max_side=32, max_pixels=32 * 32)
    checker = np.indices((256, 256)).sum(axis=0) % 2 * 255  # 1-px checkerboard
    x = tf(Image.fromarray(checker.astype(np.uint8), "L"))
    assert x.shape == (3, 32, 32)
    assert x.abs().max() < 0.2  # antialiased: the checkerboard averages to mid-grey instead of aliasing


@pytest.mark.parametrize("kwargs", [dict(stride=0, min_side=1, max_side=8, max_pixels=64),
                                    dict(stride=16, min_side=1, max_side=8, max_pixels=1024),
                                    dict(stride=16, min_side=1, max_side=64, max_pixels=100),
                                    dict(stride=16, min_side=1, max_side=64, max_pixels=4096, std=(1, 0, 1))])
def test_invalid_settings_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        ImageTransform(**kwargs)


def test_target_size_handles_extreme_aspect_ratios_within_pixel_budget():
    tf = ImageTransform(stride=16, min_side=16, max_side=4096, max_pixels=16 * 64)
    w, h = tf.target_size(10, 100_000)
    assert w == 16 and h <= 64 and w * h <= tf.max_pixels and math.gcd(w, h) >= 16
