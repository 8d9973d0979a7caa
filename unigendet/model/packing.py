"""Packed sequences: the data <-> model contract of docs/method.md, "Packed sequences".

A batch is ONE sequence holding several samples back to back. Each sample is a list of splits:

| split            | tokens                                      | mode     | RoPE position                  |
|------------------|---------------------------------------------|----------|--------------------------------|
| ``TextSplit``    | <|im_start|> ids <|im_end|>                 | causal   | +1 per token                   |
| ``ViTSplit``     | <|vision_start|> patches <|vision_end|>      | full     | one for the split, then +1     |
| ``VAESplit``     | <|vision_start|> latents <|vision_end|>      | full     | one for the split, then +1     |
|   (noisy=True)   |                                             | noise    | one for the split, no advance  |

* a text split with ``loss`` predicts ids + <|im_end|> from <|im_start|> + ids (``ce_indexes``/``ce_labels``);
* a sample with a ``label`` is a detection sample: the real/fake head reads the answer's <|im_start|>, i.e. the
  first token of its first text split with loss (``det_indexes``);
* a noisy VAE split carries a raw timestep (N(0,1) unless given) and flow loss on its latent tokens
  (``mse_indexes``); a clean one has raw = -inf (t = 0). Marker tokens are text tokens (und expert).

``pack(plans, cfg)`` builds a :class:`PackedBatch`; everything in it is a tensor or a list of ints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from unigendet.model.config import UniGenDetConfig
from unigendet.model.vit import grid_position_ids, patchify

#####################################################################################################
# Sequence plans
#####################################################################################################


@dataclass
class TextSplit:
    """<|im_start|> ids <|im_end|>. ``open=True`` leaves out <|im_end|>: an answer being generated (inference);
    an open split must be the sample's last and carries no loss."""

    ids: list[int]
    loss: bool = False
    open: bool = False

    def __post_init__(self) -> None:
        if self.open and self.loss:
            raise ValueError("an open (unfinished) text split cannot carry a loss")


@dataclass
class ViTSplit:
    """A normalised image (C, H, W), H and W multiples of the ViT patch size."""

    image: Tensor


@dataclass
class VAESplit:
    """An image (C, H, W) in [-1, 1] (encoded by the model's VAE) or a ready latent (z, H/ds, W/ds).

    H and W (or the latent sides) must be multiples of the pixels (latent pixels) one VAE token covers.
    ``noisy`` makes it a generation target with flow loss; ``timestep`` is the raw (pre-sigmoid) value.
    """

    image: Tensor | None = None
    latent: Tensor | None = None
    noisy: bool = False
    timestep: float | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.latent is None):
            raise ValueError("a VAE split needs exactly one of image / latent")


Split = TextSplit | ViTSplit | VAESplit


@dataclass
class SamplePlan:
    splits: list[Split]
    label: int | None = None  # detection samples: 0 = fake, 1 = real
    sample_id: str | int | None = None


#####################################################################################################
# The packed batch
#####################################################################################################


@dataclass
class PackedBatch:
    """One packed sequence of T tokens. Index tensors point into [0, T)."""

    sample_lens: list[int]
    split_lens: list[int]  # flat over samples
    split_modes: list[str]
    position_ids: Tensor  # (T,) RoPE positions
    text_ids: Tensor  # (n_text,)
    text_indexes: Tensor  # (n_text,)
    vit_tokens: Tensor  # (n_vit, p*p*C)
    vit_position_ids: Tensor  # (n_vit,) row * side + col
    vit_indexes: Tensor  # (n_vit,)
    vit_seqlens: Tensor  # (n_vit_images,)
    vae_indexes: Tensor  # (n_vae,) every VAE token, clean and noisy
    vae_position_ids: Tensor  # (n_vae,)
    vae_timesteps: Tensor  # (n_vae,) raw, -inf for clean images
    vae_grids: Tensor  # (n_vae_images, 2) token grid (h, w) of each VAE image
    ce_indexes: Tensor  # (n_ce,)
    ce_labels: Tensor  # (n_ce,)
    mse_indexes: Tensor  # (n_mse,)
    det_indexes: Tensor  # (n_det,)
    det_labels: Tensor  # (n_det,)
    padded_latent: Tensor | None = None  # (n_vae_images, z, H, W), ready latents (padded to the largest)
    vae_images: list[Tensor] | None = None  # or images to encode, one (C, H, W) per VAE image
    sample_ids: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # data-pipeline counters travelling with the batch (skips, samples)

    @property
    def seq_len(self) -> int:
        return sum(self.sample_lens)

    @property
    def n_vae_tokens(self) -> int:
        return self.vae_indexes.numel()

    def to(self, device: torch.device | str) -> PackedBatch:
        def move(v):
            if isinstance(v, Tensor):
                return v.to(device)
            if isinstance(v, list) and v and isinstance(v[0], Tensor):
                return [t.to(device) for t in v]
            return v

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})


#####################################################################################################
# Builder
#####################################################################################################


def pack(plans: list[SamplePlan], cfg: UniGenDetConfig, generator: torch.Generator | None = None, *,
         allow_empty: bool = False) -> PackedBatch:
    """Pack sample plans into one sequence (docs/method.md, "Packed sequences"). Raw timesteps of noisy VAE splits
    that are not
    given are drawn from N(0, 1) with ``generator``. ``allow_empty``: zero plans give a batch of no tokens (it
    carries only ``stats``, e.g. the skips of a loader worker that found nothing usable)."""
    if not plans and not allow_empty:
        raise ValueError("cannot pack an empty list of samples")
    tok = cfg.tokens
    vit_patch, vit_side = cfg.vit.patch_size, cfg.vit.max_patches_per_side
    lat_side, lat_p = cfg.flow.max_latent_size, cfg.flow.latent_patch_size
    px_per_tok = cfg.vae_pixels_per_token

    sample_lens, split_lens, split_modes, position_ids = [], [], [], []
    text_ids, text_idx = [], []
    vit_tokens, vit_pos, vit_idx, vit_lens = [], [], [], []
    vae_idx, vae_pos, vae_t, vae_grids, vae_latents, vae_images = [], [], [], [], [], []
    ce_idx, ce_lab, mse_idx, det_idx, det_lab = [], [], [], [], []

    cursor = 0
    for plan in plans:
        start, pos = cursor, 0
        answer_start = None
        for split in plan.splits:
            if isinstance(split, TextSplit):
                ids = [tok.bos, *split.ids] + ([] if split.open else [tok.eos])
                n = len(ids)
                text_ids += ids
                text_idx += range(cursor, cursor + n)
                position_ids += range(pos, pos + n)
                if split.loss:
                    ce_idx += range(cursor, cursor + n - 1)
                    ce_lab += ids[1:]
                    if answer_start is None:
                        answer_start = cursor
                split_modes.append("causal")
                pos += n
            elif isinstance(split, ViTSplit):
                img = split.image
                h, w = img.shape[-2] // vit_patch, img.shape[-1] // vit_patch
                n = h * w + 2
                vit_tokens.append(patchify(img, vit_patch))
                vit_pos.append(grid_position_ids(h, w, vit_side))
                if int(vit_pos[-1].max()) >= cfg.vit.n_positions:
                    raise ValueError(f"a {h}x{w} patch grid needs ViT position ids up to {int(vit_pos[-1].max())}, "
                                     f"beyond the ViT's table of {cfg.vit.n_positions}")
                vit_idx += range(cursor + 1, cursor + n - 1)
                vit_lens.append(h * w)
                _markers(text_ids, text_idx, cursor, n, tok)
                position_ids += [pos] * n
                split_modes.append("full")
                pos += 1
            elif isinstance(split, VAESplit):
                if split.latent is not None:
                    side_h, side_w, unit = split.latent.shape[-2], split.latent.shape[-1], lat_p
                    vae_latents.append(split.latent)
                else:
                    side_h, side_w, unit = split.image.shape[-2], split.image.shape[-1], px_per_tok
                    vae_images.append(split.image)
                if side_h % unit or side_w % unit:
                    raise ValueError(f"VAE input {side_h}x{side_w} is not a multiple of {unit}")
                h, w = side_h // unit, side_w // unit
                n = h * w + 2
                vae_idx += range(cursor + 1, cursor + n - 1)
                vae_pos.append(grid_position_ids(h, w, lat_side))
                vae_grids.append((h, w))
                _markers(text_ids, text_idx, cursor, n, tok)
                position_ids += [pos] * n
                if split.noisy:
                    raw = split.timestep
                    if raw is None:
                        raw = float(torch.randn((), generator=generator))
                    vae_t += [raw] * (h * w)
                    mse_idx += range(cursor + 1, cursor + n - 1)
                    split_modes.append("noise")
                else:
                    vae_t += [float("-inf")] * (h * w)
                    split_modes.append("full")
                    pos += 1
            else:
                raise TypeError(f"unknown split type {type(split).__name__}")
            split_lens.append(n)
            cursor += n
        if plan.label is not None:
            if answer_start is None:
                raise ValueError(f"detection sample {plan.sample_id!r} has no text split with loss (its answer)")
            if plan.label not in (0, 1):
                raise ValueError(f"detection label must be 0 (fake) or 1 (real), got {plan.label!r}")
            det_idx.append(answer_start)
            det_lab.append(plan.label)
        sample_lens.append(cursor - start)
    if vae_latents and vae_images:
        raise ValueError("a batch must give all VAE inputs as images or all as latents, not a mix")

    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedBatch(
        sample_lens=sample_lens, split_lens=split_lens, split_modes=split_modes, position_ids=long(position_ids),
        text_ids=long(text_ids), text_indexes=long(text_idx),
        vit_tokens=torch.cat(vit_tokens) if vit_tokens else torch.zeros(0, cfg.vit.patch_dim),
        vit_position_ids=torch.cat(vit_pos) if vit_pos else long([]), vit_indexes=long(vit_idx),
        vit_seqlens=long(vit_lens),
        vae_indexes=long(vae_idx), vae_position_ids=torch.cat(vae_pos) if vae_pos else long([]),
        vae_timesteps=torch.tensor(vae_t, dtype=torch.float32), vae_grids=long(vae_grids).reshape(-1, 2),
        ce_indexes=long(ce_idx), ce_labels=long(ce_lab), mse_indexes=long(mse_idx),
        det_indexes=long(det_idx), det_labels=long(det_lab),
        padded_latent=pad_latents(vae_latents) if vae_latents else None,
        vae_images=vae_images or None,
        sample_ids=[p.sample_id for p in plans],
    )


def _markers(text_ids: list[int], text_idx: list[int], cursor: int, n: int, tok) -> None:
    text_ids += [tok.vision_start, tok.vision_end]
    text_idx += [cursor, cursor + n - 1]


def pad_latents(latents: list[Tensor]) -> Tensor:
    """Stack (z, h, w) latents of different sizes into (N, z, H_max, W_max), zero padded bottom/right."""
    z = latents[0].shape[0]
    hmax = max(t.shape[-2] for t in latents)
    wmax = max(t.shape[-1] for t in latents)
    out = latents[0].new_zeros(len(latents), z, hmax, wmax)
    for i, t in enumerate(latents):
        out[i, :, : t.shape[-2], : t.shape[-1]] = t
    return out


#####################################################################################################
# The reference's batch layout
#####################################################################################################


def from_reference_batch(tensors: dict[str, Tensor], meta: dict) -> PackedBatch:
    """A batch in the reference's (BAGEL) key layout -> PackedBatch.

    ``tensors`` holds ``packed_text_ids``, ``packed_position_ids``, ``packed_vit_tokens``, ``padded_latent``,
    ``packed_timesteps``, ``ce_loss_indexes``, ``packed_label_ids``, ``label``, ... ; ``meta`` holds
    ``sample_lens``, per-sample ``split_lens``/``attn_modes``, ``patchified_vae_latent_shapes`` and optionally
    ``det_token_indexes`` (else: the first index of each contiguous run of ``ce_loss_indexes``).
    """
    ce = tensors["ce_loss_indexes"].long()
    if "det_token_indexes" in meta:
        det = torch.tensor(meta["det_token_indexes"], dtype=torch.long)
    else:
        starts = torch.ones_like(ce, dtype=torch.bool)
        starts[1:] = ce[1:] != ce[:-1] + 1
        det = ce[starts]
    empty = torch.zeros(0, dtype=torch.long)
    get = lambda k, default=empty: tensors[k].long() if k in tensors else default  # noqa: E731
    flat = lambda xs: [x for sub in xs for x in sub] if xs and isinstance(xs[0], list) else list(xs)  # noqa: E731
    return PackedBatch(
        sample_lens=list(meta["sample_lens"]), split_lens=flat(meta["split_lens"]),
        split_modes=flat(meta["attn_modes"]), position_ids=get("packed_position_ids"),
        text_ids=get("packed_text_ids"), text_indexes=get("packed_text_indexes"),
        vit_tokens=tensors.get("packed_vit_tokens", torch.zeros(0, 0)).float(),
        vit_position_ids=get("packed_vit_position_ids"), vit_indexes=get("packed_vit_token_indexes"),
        vit_seqlens=get("vit_token_seqlens"),
        vae_indexes=get("packed_vae_token_indexes"), vae_position_ids=get("packed_latent_position_ids"),
        vae_timesteps=tensors.get("packed_timesteps", torch.zeros(0)).float(),
        vae_grids=torch.tensor(meta.get("patchified_vae_latent_shapes", []), dtype=torch.long).reshape(-1, 2),
        ce_indexes=ce, ce_labels=get("packed_label_ids"), mse_indexes=get("mse_loss_indexes"),
        det_indexes=det, det_labels=get("label"),
        padded_latent=tensors.get("padded_latent"),
    )
