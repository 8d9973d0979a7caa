"""Image transforms for the two image paths of the model: ViT patches and VAE latents.

Features:

* **One transform, two settings.** :class:`ImageTransform` resizes an RGB image, keeping its aspect ratio, to sides
  that are multiples of ``stride`` (the ViT patch size, 14 for BAGEL; or the pixels per VAE token, 16 for BAGEL), then
  normalises it to a ``(3, H, W)`` float tensor ``(x / 255 - mean) / std``. :func:`vit_transform` takes stride and
  mean/std from ``cfg.vit`` (SigLIP: 0.5 / 0.5); :func:`vae_transform` uses ``cfg.vae_pixels_per_token`` and maps
  pixels to [-1, 1].
* **Native resolution within bounds.** An image already inside the bounds keeps its size (up to stride rounding).
  Otherwise it is scaled so the short side reaches ``min_side`` and the long side stays within ``max_side`` and
  ``H * W <= max_pixels``; when the bounds conflict, the upper bounds win (a 1:10 panorama is not blown up past
  ``max_side`` to give its short side ``min_side``). Each side is then rounded to a multiple of ``stride`` (nearest,
  or the direction a bound requires), at least one stride, so the aspect ratio is kept to within one stride.
* **Sizes before pixels.** :meth:`ImageTransform.target_size` maps a header size to the output size, so token
  counts can be planned before decoding.
* **Too small to be a picture.** A decoded image whose short side is below ``min_image_side`` (8 px by default:
  icons, 1-px tracking images, 1xN strips) is rejected rather than upscaled from almost nothing: ``image_too_small``
  via :meth:`ImageTransform.apply`, or :class:`ImageTooSmall` from ``__call__``. This is an absolute limit on the
  INPUT; the output can never be smaller than one stride by construction.
* Resizing is PIL bicubic, which is antialiased when shrinking.

Default bounds follow BAGEL (ViT: 224..980 px, VAE: 512..1024 px) and scale with the preset: ``max_side`` is the
largest image the position tables cover (``vit.max_patches_per_side * patch_size`` capped by ``vit.image_size``;
``flow.max_latent_size * vae_pixels_per_token``) and ``min_side`` keeps BAGEL's ratio to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from unigendet.inputs.skips import SkipCounter
from unigendet.model.config import UniGenDetConfig

MIN_IMAGE_SIDE = 8  # inputs with a shorter side are skipped as image_too_small
VIT_MIN_RATIO = 224 / 980  # BAGEL's ViT min/max side
VAE_MIN_RATIO = 512 / 1024  # BAGEL's VAE min/max side


class ImageTooSmall(ValueError):
    """The input image is below the transform's ``min_image_side``."""


@dataclass
class ImageTransform:
    """Aspect-preserving resize to stride multiples within side/pixel bounds, then normalisation."""

    stride: int
    """Output sides are multiples of this (ViT patch size, or pixels per VAE token)."""
    min_side: int
    """Images whose short side is below this are upscaled to it (unless an upper bound forbids)."""
    max_side: int
    """Upper bound on the long side (floored to a stride multiple, at least one stride)."""
    max_pixels: int
    """Upper bound on H * W of the output."""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted from x / 255."""
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel std dividing (x / 255 - mean)."""
    min_image_side: int = MIN_IMAGE_SIDE
    """Inputs whose short side is below this are rejected (``image_too_small``)."""

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if self.stride < 1:
            raise ValueError(f"stride must be positive, got {self.stride}")
        if self.max_side < self.stride or self.max_pixels < self.stride**2:
            raise ValueError(f"max_side {self.max_side} / max_pixels {self.max_pixels} leave no room for one "
                             f"{self.stride}x{self.stride} stride")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean/std must be 3 values with std > 0, got {self.mean} / {self.std}")
        if self.min_side < 1 or self.min_image_side < 1:
            raise ValueError("min_side and min_image_side must be positive")

    # ----------------------------------------------------------------------------------------------
    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The ``(width, height)`` an input of this size is resized to."""
        st = self.stride
        cap = max(1, self.max_side // st)  # the long-side bound, in strides
        scale = max(1.0, self.min_side / min(width, height))
        scale = min(scale, cap * st / max(width, height), math.sqrt(self.max_pixels / (width * height)))
        exact = (width * scale / st, height * scale / st)  # sides in strides, before rounding
        w, h = (min(cap, max(1, round(x))) for x in exact)  # nearest multiple, within [1, cap]
        if w * h * st * st > self.max_pixels:  # rounding up broke the pixel bound: round both down instead
            w, h = (min(cap, max(1, math.floor(x))) for x in exact)
        need = math.ceil(self.min_side / st)
        sides = [w, h]
        for i, x in enumerate(exact):  # rounding down broke min_side although the bounds allowed it: round up
            other = sides[1 - i]
            if sides[i] < need <= math.ceil(x - 1e-9) and need <= cap and need * other * st * st <= self.max_pixels:
                sides[i] = need
        w, h = sides
        while w * h * st * st > self.max_pixels:  # one-stride minimum on a very thin image: shorten the long side
            if w >= h:
                w -= 1
            else:
                h -= 1
        return w * st, h * st

    def check(self, img: Image.Image) -> str | None:
        """A skip reason for an input the transform refuses, else None."""
        if min(img.size) < self.min_image_side:
            return "image_too_small"
        return None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB ``PIL.Image`` -> normalised float tensor ``(3, H, W)``.

        Raises:
            ImageTooSmall: the input's short side is below ``min_image_side``.
        """
        if self.check(img):
            raise ImageTooSmall(f"image {img.size[0]}x{img.size[1]} has a side below {self.min_image_side} px")
        if img.mode != "RGB":
            img = img.convert("RGB")
        size = self.target_size(*img.size)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().float()  # (3, H, W) 0..255
        # (x / 255 - mean) / std as one multiply-subtract, in place
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(3, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std, strict=True)]).view(3, 1, 1)
        return x.mul_(scale).sub_(shift)

    def apply(self, img: Image.Image, skips: SkipCounter, example_id: str) -> torch.Tensor | None:
        """Like ``__call__``, but a refused image is a counted skip (None) instead of an exception."""
        reason = self.check(img)
        if reason:
            skips.skip(reason, example_id, f"{img.size[0]}x{img.size[1]}, minimum side {self.min_image_side} px")
            return None
        return self(img)


#####################################################################################################
# Factories
#####################################################################################################


def _min_side(max_side: int, ratio: float, stride: int) -> int:
    return max(stride, round(max_side * ratio / stride) * stride)


def vit_transform(cfg: UniGenDetConfig, min_side: int | None = None, max_side: int | None = None,
                  max_pixels: int | None = None, min_image_side: int = MIN_IMAGE_SIDE) -> ImageTransform:
    """The ViT-resolution transform: stride ``cfg.vit.patch_size``, normalised with ``cfg.vit.mean/std``.

    Defaults: ``max_side`` = the largest image the ViT position table covers (980 for BAGEL), ``min_side`` = 224/980
    of it rounded to the stride (224 for BAGEL), ``max_pixels`` = ``max_side ** 2``.
    """
    vit = cfg.vit
    stride = vit.patch_size
    if max_side is None:
        max_side = min(vit.image_size, vit.max_patches_per_side * stride)
    if min_side is None:
        min_side = _min_side(max_side, VIT_MIN_RATIO, stride)
    return ImageTransform(stride=stride, min_side=min_side, max_side=max_side,
                          max_pixels=max_pixels if max_pixels is not None else max_side**2,
                          mean=vit.mean, std=vit.std, min_image_side=min_image_side)


def vae_transform(cfg: UniGenDetConfig, min_side: int | None = None, max_side: int | None = None,
                  max_pixels: int | None = None, min_image_side: int = MIN_IMAGE_SIDE) -> ImageTransform:
    """The VAE-resolution transform: stride ``cfg.vae_pixels_per_token``, pixels mapped to [-1, 1].

    Defaults: ``max_side`` = the largest image the latent position table covers
    (``flow.max_latent_size * vae_pixels_per_token``, 1024 for BAGEL), ``min_side`` = half of it (512 for BAGEL),
    ``max_pixels`` = ``max_side ** 2``.
    """
    stride = cfg.vae_pixels_per_token
    if max_side is None:
        max_side = cfg.flow.max_latent_size * stride
    if min_side is None:
        min_side = _min_side(max_side, VAE_MIN_RATIO, stride)
    return ImageTransform(stride=stride, min_side=min_side, max_side=max_side,
                          max_pixels=max_pixels if max_pixels is not None else max_side**2,
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), min_image_side=min_image_side)
