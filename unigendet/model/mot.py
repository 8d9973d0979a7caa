"""Mixture-of-Transformers decoder (BAGEL's Qwen2-MoT).

Features:
* two experts per layer, ``und`` (text, ViT, markers) and ``gen`` (VAE latents), each with its own input norm,
  q/k/v (bias) / o (no bias) projections, per-head q/k RMSNorm, post-attention norm and SwiGLU MLP;
* ONE shared self-attention over the whole packed sequence (SMSA), GQA, RoPE applied after qk-norm;
* hard routing by position, done ONCE per forward: the caller hands the decoder its tokens sorted as
  ``[all und tokens | all gen tokens]`` (``n_und`` splits them), and the two residual streams stay separate
  tensors through the whole stack, so every expert op is a plain matmul on its own stream. The reference
  instead scatters each projection's output into a full-size zero tensor (``new_zeros`` + index_put per
  projection, 7 per layer); here the only copies are the three concatenations (q, k, v) that feed attention.
  Attention is permutation-equivariant, so the sorted order only has to be reflected in the mask and the RoPE
  positions (see ``attention.AttentionMask``).
* final norms ``norm_und`` / ``norm_gen``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unigendet.model.attention import AttentionMask, SequenceLayout, attend
from unigendet.model.config import MoTConfig
from unigendet.model.layers import RMSNorm, SwiGLU, apply_rotary, rotary_cos_sin

EXPERTS = ("und", "gen")


@dataclass
class KVCache:
    """Keys and values of already-processed tokens, per layer (after RoPE and qk-norm), with their mask layout."""

    layout: SequenceLayout
    keys: list[Tensor]  # per layer (N, Hkv, hd)
    values: list[Tensor]

    def __len__(self) -> int:
        return len(self.layout)

#####################################################################################################
# One expert of one layer
#####################################################################################################


class Expert(nn.Module):
    """The weights one expert owns in one decoder layer."""

    def __init__(self, cfg: MoTConfig) -> None:
        super().__init__()
        d, hd = cfg.dim, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=True)
        self.wk = nn.Linear(d, cfg.n_kv_heads * hd, bias=True)
        self.wv = nn.Linear(d, cfg.n_kv_heads * hd, bias=True)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = SwiGLU(d, cfg.mlp_dim, cfg.act)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (N, D) residual stream -> q (N, H, hd), k and v (N, Hkv, hd), normalised, before RoPE."""
        h = self.attn_norm(x)
        q = self.q_norm(self.wq(h).unflatten(-1, (self.n_heads, self.head_dim)))
        k = self.k_norm(self.wk(h).unflatten(-1, (self.n_kv_heads, self.head_dim)))
        v = self.wv(h).unflatten(-1, (self.n_kv_heads, self.head_dim))
        return q, k, v

    def ffn(self, x: Tensor) -> Tensor:
        return self.mlp(self.mlp_norm(x))


#####################################################################################################
# Decoder layer and decoder
#####################################################################################################


class MoTDecoderLayer(nn.Module):
    """One layer: shared attention over und+gen tokens, expert-specific everything else. The FSDP unit."""

    def __init__(self, cfg: MoTConfig) -> None:
        super().__init__()
        self.und = Expert(cfg)
        self.gen = Expert(cfg)

    def forward(self, xu: Tensor, xg: Tensor, cos: Tensor, sin: Tensor,
                attn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """xu: (n_und, D), xg: (n_gen, D) residual streams; cos/sin: (T, hd) in [und | gen] order;
        attn: (q, k, v) -> (T, H*hd). Only q, k, v are concatenated; everything else stays per expert."""
        n_und = xu.shape[0]
        qu, ku, vu = self.und.qkv(xu)
        qg, kg, vg = self.gen.qkv(xg)
        q = apply_rotary(torch.cat([qu, qg]), cos, sin)  # (T, H, hd)
        k = apply_rotary(torch.cat([ku, kg]), cos, sin)  # (T, Hkv, hd)
        o = attn(q, k, torch.cat([vu, vg]))  # (T, H*hd)
        xu = xu + self.und.wo(o[:n_und])
        xg = xg + self.gen.wo(o[n_und:])
        return xu + self.und.ffn(xu), xg + self.gen.ffn(xg)


class MoTDecoder(nn.Module):
    def __init__(self, cfg: MoTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm_und = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm_gen = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, n_und: int, position_ids: Tensor, mask: AttentionMask, *,
                backend: str = "auto", keep_layers: tuple[int, ...] = (), n_layers: int | None = None,
                final_norm: bool = True, cache: KVCache | None = None,
                store: bool = False) -> tuple[Tensor, dict[int, Tensor], KVCache | None]:
        """Run the decoder on tokens sorted [und | gen].

        Args:
            x: (T, D) input embeddings in sorted order.
            n_und: number of und tokens (the first rows).
            position_ids: (T,) RoPE positions in sorted order.
            mask: the attention mask; queries are these tokens, keys are ``cache`` (if any) followed by them.
            keep_layers: return the residual stream after these layers (1-based counts), before any norm.
            n_layers: stop after this many layers (DIGA teacher); the final norm is then skipped.
            cache: keys/values of earlier tokens (inference), attended to but not recomputed.
            store: also return the keys/values of cache + these tokens (``mask.kv`` is their layout).
        Returns:
            (T, D) final states (normed when the whole stack ran and ``final_norm``), {layer: (T, D)}, and the
            extended cache when ``store``.
        """
        cos, sin = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        keys: list[Tensor] = []
        values: list[Tensor] = []

        def attn_for(i: int):
            def attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                if cache is not None:
                    k, v = torch.cat([cache.keys[i], k]), torch.cat([cache.values[i], v])
                if store:
                    keys.append(k)
                    values.append(v)
                return attend(q, k, v, mask, backend)

            return attn

        stop = len(self.layers) if n_layers is None else n_layers
        kept: dict[int, Tensor] = {}
        xu, xg = x[:n_und], x[n_und:]
        for i, layer in enumerate(self.layers[:stop]):
            xu, xg = layer(xu, xg, cos, sin, attn_for(i))
            if i + 1 in keep_layers:
                kept[i + 1] = torch.cat([xu, xg])
        if stop == len(self.layers) and final_norm:
            xu, xg = self.norm_und(xu), self.norm_gen(xg)
        new_cache = KVCache(mask.kv, keys, values) if store else None
        return torch.cat([xu, xg]), kept, new_cache
