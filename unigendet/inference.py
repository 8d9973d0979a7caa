"""Inference: detect-and-explain and text-to-image generation, batched and packed, with KV caches.

Features:
* **Detect.** Per image [clean VAE] [ViT] [prompt] then the answer's <|im_start|>: the real/fake head on that token
  gives p(fake) from ONE forward; the explanation is then decoded (greedy, or temperature sampling) from a KV cache,
  one token per image per step, until <|im_end|> or ``max_new_tokens``. Images of different sizes are packed, not
  padded. ``with_vae=False`` omits the VAE split, as the authors' demo does (although their training used it).
* **Generate.** The captions' context is run once and its keys/values cached; every Euler step then runs only the
  noisy image tokens ([vision_start] latents [vision_end], ``noise`` mode) against that cache. Classifier-free
  guidance adds a caption-less copy of each image (its context is empty: training drops the whole caption split),
  within a guidance interval, with optional renormalisation. Per-image seeds: an image does not depend on its batch.
* ``use_cache=False`` recomputes everything from scratch at every step: the reference for the cache tests and the
  "without KV cache" benchmark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from unigendet.constants import DETECTION_PROMPT
from unigendet.inputs.tokenizer import Tokenizer
from unigendet.inputs.transforms import vae_transform, vit_transform
from unigendet.model import flow
from unigendet.model.attention import CAUSAL, NOISE, SequenceLayout
from unigendet.model.mot import KVCache
from unigendet.model.packing import SamplePlan, TextSplit, VAESplit, ViTSplit, pack
from unigendet.model.unigendet import UniGenDet, unpatchify_latent

#####################################################################################################
# Results
#####################################################################################################


@dataclass
class Detection:
    p_fake: float
    label: str  # "fake" | "real", from the head
    explanation: str | None = None
    tokens: list[int] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)  # per decoding step (only with return_logits)
    seconds: float = 0.0


@dataclass
class _Ctx:
    """A processed context: its cache (or, uncached, what is needed to recompute it) and per-sample bookkeeping."""

    cache: KVCache | None
    embeds: Tensor
    is_gen: Tensor
    positions: Tensor
    layout: SequenceLayout


#####################################################################################################
# The engine
#####################################################################################################


class Engine:
    def __init__(self, model: UniGenDet, tokenizer: Tokenizer) -> None:
        tokenizer.check_config(model.cfg)
        self.model, self.tok, self.cfg = model.eval(), tokenizer, model.cfg
        self.vit_tf, self.vae_tf = vit_transform(model.cfg), vae_transform(model.cfg)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    # ----------------------------------------------------------------------------------------------
    # shared pieces
    # ----------------------------------------------------------------------------------------------
    def _prefill(self, plans: list[SamplePlan], store: bool) -> tuple[_Ctx, Tensor, object]:
        """Run packed plans; return the context, the final states in SORTED order and the batch."""
        batch = pack(plans, self.cfg).to(self.device)
        inputs = self.model.embed_inputs(batch)
        layout = SequenceLayout.build(batch.sample_lens, batch.split_lens, batch.split_modes, device=self.device)
        is_gen = torch.zeros(batch.seq_len, dtype=torch.bool, device=self.device)
        is_gen[batch.vae_indexes] = True
        h, _, inv, cache = self.model.decode(inputs["embeds"], is_gen, batch.position_ids, layout, store=store)
        ctx = _Ctx(cache, inputs["embeds"], is_gen, batch.position_ids, layout)
        return ctx, h[inv], batch

    def _extend(self, ctx: _Ctx, x: Tensor, is_gen: Tensor, positions: Tensor, layout: SequenceLayout,
                store: bool, use_cache: bool) -> tuple[Tensor, _Ctx]:
        """Final states (input order) of new tokens after the context; with ``store`` the context grows."""
        if use_cache:
            h, _, inv, cache = self.model.decode(x, is_gen, positions, layout, cache=ctx.cache, store=store)
            grown = _Ctx(cache, ctx.embeds, ctx.is_gen, ctx.positions, ctx.layout) if store else ctx
            return h[inv], grown
        # no cache: the context and the new tokens, from scratch
        all_x = torch.cat([ctx.embeds, x])
        all_gen = torch.cat([ctx.is_gen, is_gen])
        all_pos = torch.cat([ctx.positions, positions])
        all_layout = SequenceLayout.cat([ctx.layout, layout])
        h, _, inv, _ = self.model.decode(all_x, all_gen, all_pos, all_layout)
        h = h[inv]
        grown = _Ctx(None, all_x, all_gen, all_pos, all_layout) if store else ctx
        return h[len(ctx.embeds):], grown

    # ----------------------------------------------------------------------------------------------
    # detection
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, images: list[Image.Image], *, prompt: str = DETECTION_PROMPT, with_vae: bool = True,
               explain: bool = True, max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
               use_cache: bool = True, return_logits: bool = False) -> list[Detection]:
        t0 = time.perf_counter()
        prompt_ids = self.tok.encode(prompt)
        plans = []
        for img in images:
            splits = [VAESplit(image=self.vae_tf(img))] if with_vae else []
            plans.append(SamplePlan([*splits, ViTSplit(self.vit_tf(img)), TextSplit(prompt_ids),
                                     TextSplit([], open=True)]))
        ctx, h, batch = self._prefill(plans, store=explain and use_cache)
        last = torch.tensor(batch.sample_lens, device=self.device).cumsum(0) - 1  # each answer's <|im_start|>
        probs = torch.softmax(self.model.det_head(h[last]).float(), dim=-1)
        results = [Detection(p_fake=float(p[0]), label="fake" if p[0] >= p[1] else "real") for p in probs]
        if explain:
            self._explain(results, ctx, h[last], batch, last, max_new_tokens, temperature, seed, use_cache,
                          return_logits)
        seconds = (time.perf_counter() - t0) / max(1, len(images))
        for r in results:
            r.seconds = seconds
        return results

    def _explain(self, results: list[Detection], ctx: _Ctx, h_last: Tensor, batch, last: Tensor, max_new: int,
                 temperature: float, seed: int, use_cache: bool, return_logits: bool) -> None:
        g = torch.Generator(device=self.device).manual_seed(seed)
        eos = self.cfg.tokens.eos
        positions = batch.position_ids[last]  # (B,) position of each <|im_start|>
        splits = ctx.layout.split[last]
        active = torch.arange(len(results), device=self.device)
        logits = self.model.lm_head(h_last).float()
        next_index = len(ctx.layout)
        for step in range(max_new):
            if return_logits:
                for i, row in zip(active.tolist(), logits, strict=True):
                    results[i].logits.append(row.cpu())
            if temperature > 0:
                tokens = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g).squeeze(1)
            else:
                tokens = logits.argmax(-1)
            for i, t in zip(active.tolist(), tokens.tolist(), strict=True):
                results[i].tokens.append(t)
            keep = tokens != eos
            active, tokens = active[keep], tokens[keep]
            if active.numel() == 0 or step == max_new - 1:
                break
            n = active.numel()
            layout = SequenceLayout(active.clone(), splits[active], torch.full_like(active, CAUSAL),
                                    torch.arange(next_index, next_index + n, device=self.device))
            next_index += n
            x = self.model.embed(tokens)
            h, ctx = self._extend(ctx, x, torch.zeros(n, dtype=torch.bool, device=self.device),
                                  positions[active] + step + 1, layout, store=True, use_cache=use_cache)
            logits = self.model.lm_head(h).float()
        for r in results:
            ids = r.tokens[:-1] if r.tokens and r.tokens[-1] == eos else r.tokens
            r.explanation = self.tok.decode(ids)

    # ----------------------------------------------------------------------------------------------
    # generation
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_latents(self, prompts: list[str], *, height: int, width: int, steps: int | None = None,
                         shift: float | None = None, cfg_scale: float | None = None,
                         cfg_interval: tuple[float, float] | None = None, renorm_min: float | None = None,
                         seed: int | list[int] = 0, use_cache: bool = True) -> tuple[Tensor, tuple[int, int]]:
        """Euler-sample latent tokens: (B, h*w, p*p*z) and the token grid (h, w)."""
        fc = self.cfg.flow
        sampler = fc.sampler_settings(steps, shift, cfg_scale, cfg_interval, renorm_min)
        self.cfg.check_image_size(height, width)
        unit = self.cfg.vae_pixels_per_token
        gh, gw = height // unit, width // unit
        B = len(prompts)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(B)]
        dev, dim = self.device, self.cfg.latent_token_dim
        x = torch.stack([torch.randn(gh * gw, dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
        x = x.to(dev, self.model.vae2llm.weight.dtype)

        ctx, _, batch = self._prefill([SamplePlan([TextSplit(self.tok.encode(p))]) for p in prompts],
                                      store=use_cache)
        image_pos = torch.tensor(batch.sample_lens, device=dev)  # next free position after each caption
        n_splits = int(ctx.layout.split.max()) + 1
        grid_ids = (torch.arange(gh, device=dev)[:, None] * fc.max_latent_size
                    + torch.arange(gw, device=dev)[None, :]).reshape(-1)
        tok = self.cfg.tokens
        markers = self.model.embed(torch.tensor([tok.vision_start, tok.vision_end], device=dev))
        n_img = gh * gw + 2

        def velocity(x_t: Tensor, t: Tensor, guided: bool):
            copies = 2 if guided else 1
            n = B * copies
            t_tok = self.model.time_embed(t.reshape(1).to(x_t.dtype)).expand(gh * gw, -1)
            lat = self.model.vae2llm(x_t.to(t_tok.dtype)) + t_tok + self.model.latent_pos_embed(grid_ids)  # (B, hw, D)
            lat = lat.repeat(copies, 1, 1)
            emb = torch.cat([markers[0].expand(n, 1, -1), lat, markers[1].expand(n, 1, -1)], dim=1).flatten(0, 1)
            is_gen = torch.zeros(n, n_img, dtype=torch.bool, device=dev)
            is_gen[:, 1:-1] = True
            sample = torch.arange(n, device=dev)  # conditional copies are samples 0..B-1, as in the context
            pos = torch.cat([image_pos, torch.zeros(n - B, dtype=torch.long, device=dev)])
            layout = SequenceLayout(sample.repeat_interleave(n_img), (n_splits + sample).repeat_interleave(n_img),
                                    torch.full((n * n_img,), NOISE, device=dev),
                                    len(ctx.layout) + torch.arange(n * n_img, device=dev))
            h, _ = self._extend(ctx, emb, is_gen.flatten(), pos.repeat_interleave(n_img), layout, store=False,
                                use_cache=use_cache)
            v = self.model.llm2vae(h.reshape(n, n_img, -1)[:, 1:-1]).float()
            return (v[:B], v[B:]) if guided else (v, None)

        out = flow.euler_sample(velocity, x.float(), **sampler)
        return out, (gh, gw)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, height: int = 256, width: int = 256, **kwargs) -> list[Image.Image]:
        tokens, (gh, gw) = self.generate_latents(prompts, height=height, width=width, **kwargs)
        p = self.cfg.flow.latent_patch_size
        images = []
        for t in tokens:
            latent = unpatchify_latent(t.to(self.model.vae2llm.weight.dtype), gh, gw, p)
            images.append(to_pil(self.model.vae.decode(latent[None].to(self.model.vae_dtype))[0]))
        return images


class UniGenDetPipeline(Engine):
    """An :class:`Engine` loaded from a BAGEL / UniGenDet folder (ours or the authors') with its tokenizer."""

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        strict: bool = True) -> UniGenDetPipeline:
        from unigendet.checkpoint.loading import is_training_checkpoint, load_model

        path = Path(path)
        if is_training_checkpoint(path):  # a training checkpoint carries its tokenizer
            import tempfile

            from unigendet.checkpoint.loading import load_lightning_checkpoint

            model, report, tok_json = load_lightning_checkpoint(path, device=device, dtype=dtype)
            if tok_json is None:
                raise ValueError(f"{path} holds no tokenizer (it was saved without a data module)")
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "tokenizer.json").write_text(tok_json)
                tokenizer = Tokenizer(Path(d) / "tokenizer.json")
        else:
            model, report = load_model(path, device=device, dtype=dtype, strict=strict)
            tokenizer = Tokenizer(path)
        pipe = cls(model, tokenizer)
        pipe.load_report, pipe.source = report, path
        return pipe


def to_pil(x: Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
