"""Declarative name maps between unigendet's modules and BAGEL / UniGenDet checkpoint keys.

``BAGEL_MAP`` pairs our parameter name patterns with the reference's (``{}`` is a layer index); ``AE_PREFIX`` maps
our ``vae.*`` onto the FLUX autoencoder file's bare ``encoder.*``/``decoder.*`` keys. Every transform is a pure
rename: the tensors are stored exactly as the reference stores them (the ViT patch embedding is already a Linear
[D, 588] in (h, w, c) order).
"""

from __future__ import annotations

import re

_LAYER = "language_model.model.layers.{}."
_VIT = "vit_model.vision_model."


def _expert_map(ours: str, sfx: str) -> list[tuple[str, str]]:
    pairs = [
        ("attn_norm.weight", f"input_layernorm{sfx}.weight"),
        ("mlp_norm.weight", f"post_attention_layernorm{sfx}.weight"),
        ("q_norm.weight", f"self_attn.q_norm{sfx}.weight"),
        ("k_norm.weight", f"self_attn.k_norm{sfx}.weight"),
        ("wo.weight", f"self_attn.o_proj{sfx}.weight"),
        ("mlp.gate.weight", f"mlp{sfx}.gate_proj.weight"),
        ("mlp.up.weight", f"mlp{sfx}.up_proj.weight"),
        ("mlp.down.weight", f"mlp{sfx}.down_proj.weight"),
    ]
    for proj in "qkv":
        for kind in ("weight", "bias"):
            pairs.append((f"w{proj}.{kind}", f"self_attn.{proj}_proj{sfx}.{kind}"))
    return [(f"decoder.layers.{{}}.{ours}.{a}", _LAYER + b) for a, b in pairs]


def _linear(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]


BAGEL_MAP: list[tuple[str, str]] = [
    ("embed.weight", "language_model.model.embed_tokens.weight"),
    *_expert_map("und", ""),
    *_expert_map("gen", "_moe_gen"),
    ("decoder.norm_und.weight", "language_model.model.norm.weight"),
    ("decoder.norm_gen.weight", "language_model.model.norm_moe_gen.weight"),
    ("lm_head.weight", "language_model.lm_head.weight"),
    # ViT
    *_linear("vit.patch_embed", _VIT + "embeddings.patch_embedding"),
    ("vit.pos_embed.weight", _VIT + "embeddings.position_embedding.weight"),
    *_linear("vit.blocks.{}.norm1", _VIT + "encoder.layers.{}.layer_norm1"),
    *_linear("vit.blocks.{}.norm2", _VIT + "encoder.layers.{}.layer_norm2"),
    *_linear("vit.blocks.{}.attn.wq", _VIT + "encoder.layers.{}.self_attn.q_proj"),
    *_linear("vit.blocks.{}.attn.wk", _VIT + "encoder.layers.{}.self_attn.k_proj"),
    *_linear("vit.blocks.{}.attn.wv", _VIT + "encoder.layers.{}.self_attn.v_proj"),
    *_linear("vit.blocks.{}.attn.wo", _VIT + "encoder.layers.{}.self_attn.out_proj"),
    *_linear("vit.blocks.{}.mlp.fc1", _VIT + "encoder.layers.{}.mlp.fc1"),
    *_linear("vit.blocks.{}.mlp.fc2", _VIT + "encoder.layers.{}.mlp.fc2"),
    *_linear("vit.norm", _VIT + "post_layernorm"),
    # connectors, embeddings and heads
    *_linear("connector.fc1", "connector.fc1"),
    *_linear("connector.fc2", "connector.fc2"),
    ("vit_pos_embed.table", "vit_pos_embed.pos_embed"),
    ("latent_pos_embed.table", "latent_pos_embed.pos_embed"),
    *_linear("time_embed.mlp.fc1", "time_embedder.mlp.0"),
    *_linear("time_embed.mlp.fc2", "time_embedder.mlp.2"),
    *_linear("vae2llm", "vae2llm"),
    *_linear("llm2vae", "llm2vae"),
    *_linear("det_head.norm", "fake_cls_head.0"),
    *_linear("det_head.fc1", "fake_cls_head.1"),
    *_linear("det_head.fc2", "fake_cls_head.3"),
    *_linear("diga_proj.mlp.fc1", "diga_mlp.0"),
    *_linear("diga_proj.mlp.fc2", "diga_mlp.2"),
    *_linear("latent_to_vit_connector.fc1", "latent_to_vit_connector.0"),
    *_linear("latent_to_vit_connector.fc2", "latent_to_vit_connector.2"),
]

# Keys a BAGEL release does not have: they start freshly initialised when fine-tuning from BAGEL.
UNIGENDET_ONLY_PREFIXES = ("fake_cls_head.", "diga_mlp.", "latent_to_vit_connector.")

AE_PREFIX = "vae."


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")


_TO_BAGEL = [(_compile(a), b) for a, b in BAGEL_MAP]
_FROM_BAGEL = [(_compile(b), a) for a, b in BAGEL_MAP]


def _translate(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return target.format(*m.groups())
    return None


def to_bagel(name: str) -> str | None:
    """Our parameter name -> the reference key (None for names outside the map, e.g. the VAE)."""
    return _translate(name, _TO_BAGEL)


def from_bagel(key: str) -> str | None:
    """Reference key -> our parameter name (None when unknown)."""
    return _translate(key, _FROM_BAGEL)
