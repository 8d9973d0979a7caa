"""Named presets for :meth:`UniGenDetConfig.from_name`.

* ``tiny``         - unit tests: 2 layers of width 64, a 4-level tiny FLUX AE; builds and runs in milliseconds.
* ``demo``         - the CPU demo: a few million parameters, images up to 64 px (ViT patch 4), fan-in init, and a
                     small learned convolutional autoencoder (``kind="conv"``, 4x down-sampling, trained on the
                     corpus' real images in about 25 s by ``unigendet train-ae``), since nothing pretrained can be
                     downloaded; its decoder blends neighbouring tokens, which a space-to-depth map did not.
* ``debug``        - one GPU, minutes: BAGEL's widths with 2 decoder and 2 ViT layers, the real FLUX AE shape.
* ``bagel-7b-mot`` - BAGEL-7B-MoT (14B parameters, 7B active) with the UniGenDet heads.
"""

from __future__ import annotations

from typing import Any

_QWEN2_TOKENS = {"bos": 151644, "eos": 151645, "vision_start": 151652, "vision_end": 151653}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "mot": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_dim": 128, "vocab_size": 300},
        "vit": {"dim": 32, "n_layers": 2, "n_heads": 2, "mlp_dim": 64, "patch_size": 14, "image_size": 224,
                "max_patches_per_side": 16},
        "vae": {"kind": "flux", "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 16,
                "downsample": 8},
        "flow": {"latent_patch_size": 2, "max_latent_size": 16, "sample_steps": 8},
        "head": {"diga_layer": 1},
        "tokens": {"bos": 296, "eos": 297, "vision_start": 298, "vision_end": 299},
    },
    "demo": {
        "mot": {"dim": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2, "mlp_dim": 512, "vocab_size": 2048},
        # patch 4: forensic traces are a few pixels wide; 4x4 patches learn them about twice as fast per image as 8x8
        "vit": {"dim": 96, "n_layers": 3, "n_heads": 3, "mlp_dim": 256, "patch_size": 4, "image_size": 64,
                "max_patches_per_side": 16},
        # a small learned AE (`unigendet train-ae`): its decoder blends neighbouring tokens, where the pixel
        # space-to-depth left every generated 8x8 token a hard-edged block
        "vae": {"kind": "conv", "downsample": 4, "z_channels": 16, "ch": 64, "scale_factor": 1.0, "shift_factor": 0.0},
        # up to 64 px; guidance 8: swept 4-16 on the demo's val captions, the token-block ratio falls to a plateau
        # from 8 on (BENCHMARKS.md, issue 15)
        "flow": {"latent_patch_size": 2, "max_latent_size": 8, "sample_steps": 25, "cfg_scale": 8.0},
        "weight_init": "fan_in",  # narrow and from scratch: normal(0.02) starts every branch near-linear
        "head": {"diga_layer": 2, "zero_init": False},  # trained from scratch: nothing to keep unchanged
        "tokens": {"bos": 2044, "eos": 2045, "vision_start": 2046, "vision_end": 2047},
    },
    "debug": {
        "mot": {"n_layers": 2},
        "vit": {"n_layers": 2},
        "head": {"diga_layer": 2},
        "tokens": dict(_QWEN2_TOKENS),
    },
    "bagel-7b-mot": {
        "mot": {"dim": 3584, "n_layers": 28, "n_heads": 28, "n_kv_heads": 4, "mlp_dim": 18944, "vocab_size": 152064,
                "rope_theta": 1_000_000.0, "norm_eps": 1e-6},
        "vit": {"dim": 1152, "n_layers": 26, "n_heads": 16, "mlp_dim": 4304, "patch_size": 14, "image_size": 980,
                "max_patches_per_side": 70},
        "vae": {"kind": "flux", "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 16,
                "downsample": 8, "scale_factor": 0.3611, "shift_factor": 0.1159},
        "flow": {"latent_patch_size": 2, "max_latent_size": 64, "timestep_shift": 1.0},
        "head": {"diga_layer": 8},
        "tokens": dict(_QWEN2_TOKENS),
    },
}
