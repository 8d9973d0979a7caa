"""Generation and head-only detection from the network being trained, for fresh fakes, the callbacks and the
evaluation: eval mode (restored after), the EMA weights on request, parameters gathered under FSDP2, and the global
random streams left as they were, so that what a callback samples never changes the training that follows (a
detection forward draws flow noise even for clean latents; a validation-time sample used to shift every later
step's noise)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from unigendet.constants import DETECTION_PROMPT
from unigendet.distributed.sharding import unsharded
from unigendet.inference import Engine
from unigendet.training.data_contract import TrainingData


@contextlib.contextmanager
def sampling_weights(model, ema, use_ema: bool):
    """The network in eval mode with its EMA weights swapped in when asked, whole (un-sharded), inside a fork of the
    global random streams (CPU, and the model's CUDA device)."""
    was_training = model.training
    swap = ema.swap(model) if (use_ema and ema is not None) else contextlib.nullcontext()
    device = model.embed.weight.device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), swap, unsharded(model):
            yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_images(model, ema, tok, prompts: list[str], *, height: int, width: int, steps: int = 25, seed: int = 0,
                    cfg_scale: float | None = None, use_ema: bool = False) -> list:
    """PIL images for ``prompts`` (image i seeded on its own from ``seed``)."""
    with sampling_weights(model, ema, use_ema):
        return Engine(model, tok).generate(prompts, height=height, width=width, steps=steps, seed=seed,
                                           cfg_scale=cfg_scale)


@torch.no_grad()
def detect_images(model, ema, data: TrainingData, images: list, *, use_ema: bool = False,
                  batch_size: int = 8) -> Tensor:
    """p(fake) from the real/fake head (no explanation) for PIL images, presented as the detection data presents
    them (its transforms, question and VAE split): (N,) on the CPU."""
    if data is None:
        raise TypeError("detect_images needs a data module that implements "
                        "unigendet.training.data_contract.TrainingData (the DataModules in data_modules/ do)")
    side = data.detection
    out = []
    with sampling_weights(model, ema, use_ema):
        engine = Engine(model, data.tok)
        if side is not None:
            engine.vit_tf, engine.vae_tf = data.vit_tf(), data.vae_tf()
        prompt = (side.prompt if side is not None else None) or DETECTION_PROMPT
        with_vae = side.with_vae if side is not None else True
        for i in range(0, len(images), batch_size):
            out += [r.p_fake for r in engine.detect(images[i: i + batch_size], prompt=prompt, explain=False,
                                                    with_vae=with_vae)]
    return torch.tensor(out)
