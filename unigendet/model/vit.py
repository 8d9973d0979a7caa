"""SigLIP NaViT encoder and the connector into the decoder.

Features:
* images of any aspect ratio arrive as packed 14x14 patches, flattened in (h, w, c) order (``patchify``);
  the patch embedding is a Linear (BAGEL stores the SigLIP conv that way);
* a learned absolute position table indexed by the flattened 2-D patch coordinate ``row * side + col``;
* pre-LN blocks (gelu-tanh MLP), each image attending only to itself (document mask over the packed patches);
* ``post_layernorm`` after the last kept layer (BAGEL keeps 26 of SigLIP's 27 layers);
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unigendet.model.attention import AttentionMask, SequenceLayout, attend
from unigendet.model.config import ViTConfig
from unigendet.model.layers import MLP2

#####################################################################################################
# Patches
#####################################################################################################


def patchify(image: Tensor, patch: int) -> Tensor:
    """(C, H, W) with H, W multiples of ``patch`` -> (H/p * W/p, p*p*C) in (h, w, p, q, c) order."""
    c, h, w = image.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = image.reshape(c, h // patch, patch, w // patch, patch)
    return x.permute(1, 3, 2, 4, 0).reshape((h // patch) * (w // patch), patch * patch * c)


def grid_position_ids(h: int, w: int, side: int, device: torch.device | str = "cpu") -> Tensor:
    """Flattened ``row * side + col`` ids of an h x w grid (extrapolation mode: rows and cols as they are)."""
    if h > side or w > side:
        raise ValueError(f"a {h}x{w} token grid exceeds the {side}x{side} position table")
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    return (rows * side + cols).reshape(-1)


#####################################################################################################
# Encoder
#####################################################################################################


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim)
        self.wk = nn.Linear(cfg.dim, cfg.dim)
        self.wv = nn.Linear(cfg.dim, cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, mask: AttentionMask, backend: str) -> Tensor:  # (N, D)
        q, k, v = (w(x).unflatten(-1, (self.n_heads, self.head_dim)) for w in (self.wq, self.wk, self.wv))
        return self.wo(attend(q, k, v, mask, backend))


class ViTBlock(nn.Module):
    """Pre-LN SigLIP block. The FSDP unit of the encoder."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = ViTAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP2(cfg.dim, cfg.mlp_dim, cfg.dim, cfg.act)

    def forward(self, x: Tensor, mask: AttentionMask, backend: str) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, backend)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.n_positions, cfg.dim)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward_features(self, patches: Tensor, position_ids: Tensor, seqlens: Tensor,
                         backend: str = "auto") -> Tensor:
        """patches: (N, p*p*C) of all images back to back; position_ids: (N,); seqlens: (n_images,) -> (N, D)."""
        mask = AttentionMask(SequenceLayout.documents(seqlens))
        x = self.patch_embed(patches) + self.pos_embed(position_ids)
        for block in self.blocks:
            x = block(x, mask, backend)
        return self.norm(x)

    forward = forward_features
