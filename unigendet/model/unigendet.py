"""UniGenDet: one BAGEL-style Mixture-of-Transformers network that generates images and detects fakes.

Features:
* ``forward(batch, noise=None)`` on a :class:`PackedBatch` returns per-token CE, per-token flow MSE, real/fake
  logits at the answer-start positions and, on request, hidden states after chosen layers (DIGA) and the final
  hidden states;
* the packed input is assembled once (text embeddings, ViT -> connector + sin-cos table, VAE latents ->
  vae2llm + timestep embedding + sin-cos table), then permuted to ``[und | gen]`` order for the decoder, so
  expert routing costs one gather in and nothing per layer (see ``mot.py``);
* the attention kernel is chosen per call: ``sdpa`` (dense bool mask, any device), ``flex`` (block-sparse
  FlexAttention, CUDA) or ``auto``;
* the VAE is a frozen submodule (``vae``) used when a batch brings images instead of latents;
* build on the meta device, then ``to_empty`` + ``init_weights()`` or a checkpoint load.

Paper: UniGenDet (CVPR 2026, arXiv 2604.21904); base model BAGEL (arXiv 2505.14683).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unigendet.model import flow
from unigendet.model.attention import AttentionMask, SequenceLayout
from unigendet.model.config import UniGenDetConfig
from unigendet.model.heads import DetectionHead, DigaProjector, TimestepEmbedder
from unigendet.model.layers import MLP2, PosEmbed2D
from unigendet.model.mot import KVCache, MoTDecoder
from unigendet.model.packing import PackedBatch
from unigendet.model.vae import build_autoencoder
from unigendet.model.vit import ViT

#####################################################################################################
# Latent (un)patchify
#####################################################################################################


def patchify_latent(latent: Tensor, h: int, w: int, p: int) -> Tensor:
    """(z, >=h*p, >=w*p) latent -> (h*w, p*p*z) tokens in (h, w, p, q, c) order; padding is cut off."""
    z = latent.shape[0]
    x = latent[:, : h * p, : w * p].reshape(z, h, p, w, p)
    return x.permute(1, 3, 2, 4, 0).reshape(h * w, p * p * z)


def unpatchify_latent(tokens: Tensor, h: int, w: int, p: int) -> Tensor:
    """Inverse of ``patchify_latent``: (h*w, p*p*z) -> (z, h*p, w*p)."""
    z = tokens.shape[-1] // (p * p)
    return tokens.reshape(h, w, p, p, z).permute(4, 0, 2, 1, 3).reshape(z, h * p, w * p)


#####################################################################################################
# The network
#####################################################################################################


class UniGenDet(nn.Module):
    def __init__(self, cfg: UniGenDetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.mot.dim
        self.attn_backend = "auto"
        # decoder side
        self.embed = nn.Embedding(cfg.mot.vocab_size, d)
        self.decoder = MoTDecoder(cfg.mot)
        self.lm_head = nn.Linear(d, cfg.mot.vocab_size, bias=False)
        # understanding side
        self.vit = ViT(cfg.vit)
        self.connector = MLP2(cfg.vit.dim, d, d, cfg.vit.connector_act)
        self.vit_pos_embed = PosEmbed2D(d, cfg.vit.max_patches_per_side)
        # generation side
        self.vae = build_autoencoder(cfg.vae)
        self.vae2llm = nn.Linear(cfg.latent_token_dim, d)
        self.llm2vae = nn.Linear(d, cfg.latent_token_dim)
        self.time_embed = TimestepEmbedder(d, cfg.flow.freq_dim)
        self.latent_pos_embed = PosEmbed2D(d, cfg.flow.max_latent_size)
        # heads
        self.det_head = DetectionHead(d, cfg.head)
        self.diga_proj = DigaProjector(d, cfg.head.diga_mult) if cfg.head.diga else None
        self.latent_to_vit_connector = (MLP2(cfg.latent_token_dim, d, d, "gelu_tanh")
                                        if cfg.latent_to_vit_connector else None)
        if self.latent_to_vit_connector is not None:  # unused by the method: kept frozen, only to round-trip
            self.latent_to_vit_connector.requires_grad_(False)

    # ----------------------------------------------------------------------------------------------
    # Initialisation
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, parts: Sequence[str] | None = None, std: float = 0.02) -> None:
        """Fresh weights for the named top-level parts (all when None), e.g. after ``to_empty``: normal(std)
        Linears (normal(1/sqrt(fan_in)) when ``cfg.weight_init == "fan_in"``) and embeddings with zero biases, unit
        norms, sin-cos tables; the velocity head and the detection head's last layer start at zero (so a pretrained
        decoder starts unchanged). The VAE inits itself."""
        names = [n for n, _ in self.named_children()] if parts is None else list(parts)
        for name in names:
            part = getattr(self, name)
            if part is None:
                continue
            if name == "vae":
                part.init_weights()
                continue
            for module in part.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    fan_in = isinstance(module, nn.Linear) and self.cfg.weight_init == "fan_in"
                    nn.init.normal_(module.weight, std=module.in_features**-0.5 if fan_in else std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    module.reset_parameters()
                elif hasattr(module, "init_weights"):
                    module.init_weights()
        zeroed = [("llm2vae", self.llm2vae)] + ([("det_head", self.det_head.fc2)] if self.cfg.head.zero_init else [])
        for name, zero in zeroed:
            if name in names:
                nn.init.zeros_(zero.weight)
                nn.init.zeros_(zero.bias)

    # ----------------------------------------------------------------------------------------------
    # Inputs
    # ----------------------------------------------------------------------------------------------
    @property
    def vae_dtype(self) -> torch.dtype:
        """The frozen VAE's parameter dtype (it stays fp32 when FSDP2 casts the rest to bf16: it is not sharded);
        the rest of the network's for the parameter-free pixel AE."""
        p = next(self.vae.parameters(), None)
        return self.vae2llm.weight.dtype if p is None else p.dtype

    def clean_latent_tokens(self, batch: PackedBatch) -> Tensor:
        """x0 of every VAE token, (n_vae, p*p*z), in packed order."""
        p = self.cfg.flow.latent_patch_size
        if batch.padded_latent is not None:
            latents = list(batch.padded_latent)
        elif batch.vae_images is not None:
            sample = self.training and self.cfg.vae.sample_posterior
            with torch.no_grad():
                latents = [self.vae.encode(img[None].to(self.vae_dtype), sample=sample)[0].to(self.vae2llm.weight.dtype)
                           for img in batch.vae_images]
        else:
            return self.vae2llm.weight.new_zeros(0, self.cfg.latent_token_dim)
        if len(latents) != len(batch.vae_grids):
            raise ValueError(f"{len(latents)} VAE inputs for {len(batch.vae_grids)} VAE splits")
        grids = batch.vae_grids.tolist()
        return torch.cat([patchify_latent(lat, h, w, p) for lat, (h, w) in zip(latents, grids, strict=True)])

    def embed_inputs(self, batch: PackedBatch, noise: Tensor | None = None) -> dict[str, Tensor]:
        """The packed sequence entering layer 0, (T, D), plus the flow quantities of the VAE tokens."""
        T, d = batch.seq_len, self.cfg.mot.dim
        dtype = self.embed.weight.dtype
        x = self.embed.weight.new_zeros(T, d)
        x[batch.text_indexes] = self.embed(batch.text_ids)
        if batch.vit_indexes.numel():
            feats = self.vit(batch.vit_tokens.to(dtype), batch.vit_position_ids, batch.vit_seqlens,
                             backend=self.attn_backend)
            x[batch.vit_indexes] = self.connector(feats) + self.vit_pos_embed(batch.vit_position_ids)
        out = {}
        if batch.vae_indexes.numel():
            x0 = self.clean_latent_tokens(batch).to(dtype)
            if noise is None:
                noise = torch.randn_like(x0)
            if noise.shape != x0.shape:
                raise ValueError(f"noise must be {tuple(x0.shape)} (one row per VAE token), got {tuple(noise.shape)}")
            t = flow.time_from_raw(batch.vae_timesteps.to(x0.device).float(), self.cfg.flow.timestep_shift).to(dtype)
            x_t = flow.interpolate(x0, noise.to(dtype), t)
            x[batch.vae_indexes] = (self.vae2llm(x_t) + self.time_embed(t)
                                    + self.latent_pos_embed(batch.vae_position_ids))
            out.update(x0=x0, noise=noise, t=t)
        out["embeds"] = x
        return out

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------
    def run_decoder(self, batch: PackedBatch, x: Tensor, *, hidden_layers: Sequence[int] = (),
                    n_layers: int | None = None, store: bool = False):
        """Decoder over the packed embeddings x (T, D) of ``batch``; see ``decode``."""
        is_gen = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        is_gen[batch.vae_indexes] = True
        layout = SequenceLayout.build(batch.sample_lens, batch.split_lens, batch.split_modes, device=x.device)
        return self.decode(x, is_gen, batch.position_ids.to(x.device), layout, hidden_layers=hidden_layers,
                           n_layers=n_layers, store=store)

    def decode(self, x: Tensor, is_gen: Tensor, position_ids: Tensor, layout: SequenceLayout, *,
               cache: KVCache | None = None, store: bool = False, hidden_layers: Sequence[int] = (),
               n_layers: int | None = None) -> tuple[Tensor, dict[int, Tensor], Tensor, KVCache | None]:
        """The decoder over tokens given in any order, optionally after a KV cache.

        Args:
            x: (T, D) input embeddings; is_gen: (T,) which tokens use the gen expert; position_ids: (T,) RoPE
                positions; layout: the tokens' mask layout (``index`` must exceed every cached index).
            cache: keys/values of earlier tokens these may attend to (inference).
            store: return the cache extended by these tokens.
        Returns:
            (final states in SORTED [und | gen] order, {layer: states in input order}, inv_order, cache or None),
            where ``inv_order[i]`` is the sorted row of input token i.
        """
        T = x.shape[0]
        order = torch.cat([(~is_gen).nonzero().squeeze(1), is_gen.nonzero().squeeze(1)])
        inv = torch.empty_like(order)
        inv[order] = torch.arange(T, device=x.device)
        n_und = T - int(is_gen.sum())
        q_layout = layout.select(order)
        kv_layout = None if cache is None else SequenceLayout.cat([cache.layout, q_layout])
        mask = AttentionMask(q_layout, kv=kv_layout)
        h, kept, new_cache = self.decoder(x[order], n_und, position_ids[order], mask, backend=self.attn_backend,
                                          keep_layers=tuple(hidden_layers), n_layers=n_layers, cache=cache,
                                          store=store)
        return h, {layer: s[inv] for layer, s in kept.items()}, inv, new_cache

    def forward(self, batch: PackedBatch, noise: Tensor | None = None, *, hidden_layers: Sequence[int] = (),
                return_hidden: bool = False) -> dict[str, Tensor]:
        """Training forward.

        Args:
            batch: a packed batch (see ``packing.py``).
            noise: (n_vae_tokens, p*p*z) flow noise for every VAE token in packed order (drawn when None).
            hidden_layers: also return the residual stream after these layers (1-based), original order.
            return_hidden: also return ``last_hidden`` (T, D, after the final norms) and ``embeds``.
        Returns:
            ``ce`` (n_ce,) per-token cross-entropy, ``mse`` (n_mse, p*p*z) per-token per-channel squared error,
            ``det_logits`` (n_det, 2), ``hidden`` {layer: (T, D)} and optionally ``last_hidden``/``embeds``.
        """
        inputs = self.embed_inputs(batch, noise)
        h, kept, inv, _ = self.run_decoder(batch, inputs["embeds"], hidden_layers=hidden_layers)
        out: dict[str, Tensor | dict] = {"hidden": kept}
        ce_rows = inv[batch.ce_indexes]
        out["ce"] = F.cross_entropy(self.lm_head(h[ce_rows]).float(), batch.ce_labels, reduction="none")
        out["det_logits"] = self.det_head(h[inv[batch.det_indexes]])
        if batch.mse_indexes.numel():
            vae_row = torch.full((batch.seq_len,), -1, dtype=torch.long, device=h.device)
            vae_row[batch.vae_indexes] = torch.arange(batch.n_vae_tokens, device=h.device)
            rows = vae_row[batch.mse_indexes]
            target = flow.velocity_target(inputs["x0"][rows], inputs["noise"][rows])
            out["mse"] = flow.flow_mse(self.llm2vae(h[inv[batch.mse_indexes]]).float(), target.float())
        else:
            out["mse"] = h.new_zeros(0, self.cfg.latent_token_dim)
        if return_hidden:
            out["last_hidden"] = h[inv]
            out["embeds"] = inputs["embeds"]
        return out

    def forward_hidden(self, batch: PackedBatch, n_layers: int, noise: Tensor | None = None) -> Tensor:
        """The residual stream after the first ``n_layers`` decoder layers, (T, D) in packed order, without running
        the rest of the stack or any head (the DIGA teacher's pass)."""
        if not 1 <= n_layers <= self.cfg.mot.n_layers:
            raise ValueError(f"n_layers must be in 1..{self.cfg.mot.n_layers}, got {n_layers}")
        inputs = self.embed_inputs(batch, noise)
        _, kept, _, _ = self.run_decoder(batch, inputs["embeds"], hidden_layers=(n_layers,), n_layers=n_layers)
        return kept[n_layers]

    def project_diga(self, hidden: Tensor) -> Tensor:
        """DIGA student projection of hidden states (N, D) -> (N, D)."""
        if self.diga_proj is None:
            raise RuntimeError("this model was built without the DIGA projector (cfg.head.diga=False)")
        return self.diga_proj(hidden)


def reduce_losses(out: dict[str, Tensor], batch: PackedBatch) -> dict[str, Tensor]:
    """The reference's reductions (world size 1): mean CE over answer tokens, flow MSE mean over channels then
    tokens, mean CE of the real/fake head. Empty terms are 0 (still attached to the graph)."""
    ce, det = out["ce"], out["det_logits"]
    return {
        "loss_ce": ce.mean() if ce.numel() else ce.sum(),
        "loss_mse": flow.reduce_flow(out["mse"]),
        "loss_det": F.cross_entropy(det.float(), batch.det_labels) if det.numel() else det.sum(),
    }
