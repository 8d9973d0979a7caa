"""Building blocks against independent implementations (transformers' Qwen2 / SigLIP) and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from unigendet.model.config import ViTConfig
from unigendet.model.layers import RMSNorm, apply_rotary, rotary_cos_sin, sincos_2d_table, timestep_sinusoid
from unigendet.model.vit import ViT, grid_position_ids, patchify


def test_rmsnorm_matches_qwen2():
    qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
    ours, ref = RMSNorm(16, 1e-6), qwen2.Qwen2RMSNorm(16, eps=1e-6)
    w = torch.randn(16)
    ours.weight.data.copy_(w)
    ref.weight.data.copy_(w)
    x = torch.randn(5, 16) * 3
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    xb = x.bfloat16()
    assert torch.allclose(ours(xb).float(), ref(xb).float(), atol=1e-2)


def test_rotary_matches_qwen2_rotate_half():
    qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
    pos = torch.tensor([0, 1, 1, 1, 2, 7, 7, 3])
    cos, sin = rotary_cos_sin(pos, 16, 1e6, torch.float32)
    # the HF formula by hand: inv_freq = theta^(-2i/d), emb = cat(freqs, freqs)
    inv = 1.0 / (1e6 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.allclose(cos[5], torch.cat([torch.cos(7 * inv)] * 2))
    q, k = torch.randn(8, 4, 16), torch.randn(8, 2, 16)
    ref_q, ref_k = qwen2.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.allclose(apply_rotary(q, cos, sin), ref_q[0].transpose(0, 1), atol=1e-6)
    assert torch.allclose(apply_rotary(k, cos, sin), ref_k[0].transpose(0, 1), atol=1e-6)


def test_sincos_table_by_hand():
    table = sincos_2d_table(8, 3)  # (9, 8): first half column, second half row
    row, col = 2, 1
    omega = torch.tensor([1.0, 0.01], dtype=torch.float64)
    expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    assert torch.allclose(table[row * 3 + col], expect.float())
    with pytest.raises(ValueError):
        sincos_2d_table(6, 3)


def test_timestep_sinusoid_by_hand():
    t = torch.tensor([0.0, 0.5])
    emb = timestep_sinusoid(t, 4, max_period=10000.0)
    freqs = [1.0, math.exp(-math.log(10000.0) / 2)]
    assert torch.allclose(emb[1], torch.tensor([math.cos(0.5 * freqs[0]), math.cos(0.5 * freqs[1]),
                                                math.sin(0.5 * freqs[0]), math.sin(0.5 * freqs[1])]))
    assert torch.equal(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_vit_matches_transformers_siglip_per_image():
    """Our NaViT on two packed images equals transformers' SigLIP layers run on each image alone."""
    siglip = pytest.importorskip("transformers.models.siglip.modeling_siglip")
    from transformers import SiglipVisionConfig

    cfg = ViTConfig(dim=32, n_layers=2, n_heads=2, mlp_dim=64, patch_size=14, image_size=224, max_patches_per_side=16)
    ours = ViT(cfg)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    hf_cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                patch_size=14, image_size=224, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    hf_cfg._attn_implementation = "eager"
    layers = [siglip.SiglipEncoderLayer(hf_cfg) for _ in range(2)]
    for layer, block in zip(layers, ours.blocks, strict=True):
        pairs = {"layer_norm1": block.norm1, "layer_norm2": block.norm2, "self_attn.q_proj": block.attn.wq,
                 "self_attn.k_proj": block.attn.wk, "self_attn.v_proj": block.attn.wv,
                 "self_attn.out_proj": block.attn.wo, "mlp.fc1": block.mlp.fc1, "mlp.fc2": block.mlp.fc2}
        for name, src in pairs.items():
            dst = layer.get_submodule(name)
            dst.weight.data.copy_(src.weight)
            dst.bias.data.copy_(src.bias)
    images = [torch.randn(3, 28, 42), torch.randn(3, 42, 14)]
    patches = torch.cat([patchify(im, 14) for im in images])
    pos = torch.cat([grid_position_ids(2, 3, 16), grid_position_ids(3, 1, 16)])
    seqlens = torch.tensor([6, 3])
    with torch.no_grad():
        out = ours(patches, pos, seqlens, backend="sdpa")
        x = ours.patch_embed(patches) + ours.pos_embed(pos)
        refs = []
        for chunk in x.split([6, 3]):
            h = chunk[None]
            for layer in layers:
                h = layer(h, None)
                h = h[0] if isinstance(h, tuple) else h
            refs.append(ours.norm(h[0]))
    assert torch.allclose(out, torch.cat(refs), atol=1e-5)
