"""Configuration dataclasses for the UniGenDet network.

One dataclass per component, composed into :class:`UniGenDetConfig`:

* :class:`MoTConfig`    - the Mixture-of-Transformers decoder (Qwen2 layout, und/gen experts)
* :class:`ViTConfig`    - the SigLIP NaViT encoder and its connector
* :class:`VAEConfig`    - the frozen autoencoder (FLUX AE, or the pixel-space stand-in of the demo)
* :class:`FlowConfig`   - latent patching, timestep shift and sampler defaults
* :class:`DetHeadConfig`- the real/fake head and the DIGA projector
* :class:`TokenConfig`  - the ids of the four special tokens (read from the tokenizer when there is one)

:class:`ModelOverrides` is the typed form of preset overrides (every field optional, derived from the classes above):
what ``model_overrides`` in a training config holds, so stacked YAML files merge it key by key.

Derived fields are computed and validated in ``__post_init__`` so that a bad config fails at construction.
This module never imports torch: configs stay serialisable and cheap to build.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

#####################################################################################################
# Components
#####################################################################################################


@dataclass
class MoTConfig:
    """The decoder: a Qwen2 transformer whose every layer holds an ``und`` and a ``gen`` expert."""

    dim: int = 3584
    n_layers: int = 28
    n_heads: int = 28
    n_kv_heads: int = 4
    mlp_dim: int = 18944
    vocab_size: int = 152064
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    qk_norm: bool = True
    act: str = "silu"  # SwiGLU gate activation
    head_dim: int = 0  # derived: dim // n_heads when 0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"MoT dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads} (GQA)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_layers < 1 or self.vocab_size < 1 or self.mlp_dim < 1:
            raise ValueError("MoT n_layers, vocab_size and mlp_dim must be positive")


@dataclass
class ViTConfig:
    """SigLIP NaViT: packed 14x14 patches of any aspect ratio, per-image attention."""

    dim: int = 1152
    n_layers: int = 26  # layers actually used (BAGEL keeps 26 of SigLIP's 27)
    n_heads: int = 16
    mlp_dim: int = 4304
    patch_size: int = 14
    image_size: int = 980  # the ViT's own abs-pos table covers (image_size // patch_size) ** 2 positions
    # side of the grid that flattens patch coordinates (row * side + col) and of Bagel's sin-cos `vit_pos_embed`;
    # the same ids index the ViT's own table, so ids must stay below n_positions (the packer checks)
    max_patches_per_side: int = 70
    in_channels: int = 3
    norm_eps: float = 1e-6
    act: str = "gelu_tanh"
    connector_act: str = "gelu_tanh"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"ViT dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViT image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.mean = tuple(self.mean)
        self.std = tuple(self.std)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        """Numbers in one flattened patch, (h, w, c) order."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def n_positions(self) -> int:
        """Rows of the ViT's learned position table."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class VAEConfig:
    """The frozen autoencoder.

    ``kind="flux"`` is the FLUX AE of BAGEL (``ch``/``ch_mult``/``num_res_blocks`` describe it).
    ``kind="pixel"`` is a parameter-free, exactly invertible space-to-depth map:
    a ``downsample x downsample x in_channels`` pixel block becomes one latent "pixel" of
    ``z_channels = downsample**2 * in_channels`` numbers, normalised by ``shift_factor``/``scale_factor``.
    ``kind="conv"`` is the CPU demo's small learned autoencoder (``ch`` is its width), trained on a corpus by
    ``unigendet train-ae``; its latents come out normalised, so ``scale_factor`` 1 and ``shift_factor`` 0.
    """

    kind: Literal["flux", "pixel", "conv"] = "flux"
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 16
    downsample: int = 8
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    resolution: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # training encodes images by SAMPLING the posterior (the FLUX AE's and the reference's default); eval uses
    # the mean. The pixel AE is deterministic either way.
    sample_posterior: bool = True

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        if self.kind not in ("flux", "pixel", "conv"):
            raise ValueError(f"unknown VAE kind {self.kind!r} (expected 'flux', 'pixel' or 'conv')")
        if self.kind == "flux":
            if 2 ** (len(self.ch_mult) - 1) != self.downsample:
                raise ValueError(f"FLUX AE with ch_mult {self.ch_mult} downsamples by "
                                 f"{2 ** (len(self.ch_mult) - 1)}, not {self.downsample}")
        elif self.kind == "pixel" and self.z_channels != self.downsample**2 * self.in_channels:
            raise ValueError(f"pixel AE needs z_channels = downsample**2 * in_channels = "
                             f"{self.downsample**2 * self.in_channels}, got {self.z_channels}")


@dataclass
class FlowConfig:
    """Rectified flow in the latent space. Time convention: t=0 is data, t=1 is pure noise."""

    latent_patch_size: int = 2
    max_latent_size: int = 64  # side of the fixed sin-cos `latent_pos_embed` grid, in latent tokens
    timestep_shift: float = 1.0  # training shift s: t <- s t / (1 + (s - 1) t)
    sample_shift: float = 3.0
    sample_steps: int = 50
    cfg_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    cfg_renorm_min: float = 0.0  # 0 disables CFG renormalisation
    freq_dim: int = 256  # sinusoid width fed to the timestep embedder

    def __post_init__(self) -> None:
        self.cfg_interval = tuple(self.cfg_interval)
        if self.timestep_shift <= 0 or self.sample_shift <= 0:
            raise ValueError("timestep shifts must be positive")
        if self.freq_dim % 2:
            raise ValueError("freq_dim must be even")

    def sampler_settings(self, steps: int | None = None, shift: float | None = None, cfg_scale: float | None = None,
                         cfg_interval: tuple[float, float] | None = None,
                         renorm_min: float | None = None) -> dict[str, Any]:
        """The sampler settings a generation uses: those given, this config's defaults for the ones left None (the
        one place the defaults are filled in, so what the PNGs record is what ran)."""
        return {"steps": steps or self.sample_steps, "shift": shift or self.sample_shift,
                "cfg_scale": self.cfg_scale if cfg_scale is None else cfg_scale,
                "cfg_interval": tuple(self.cfg_interval if cfg_interval is None else cfg_interval),
                "renorm_min": self.cfg_renorm_min if renorm_min is None else renorm_min}


@dataclass
class DetHeadConfig:
    """The real/fake head (LayerNorm -> Linear(D, D/reduction) -> ReLU -> Linear(., 2)) and DIGA projector."""

    n_classes: int = 2  # class 0 = fake, 1 = real (FakeClue)
    reduction: int = 4
    norm_eps: float = 1e-5
    diga: bool = True  # build the DIGA projector (`diga_mlp.*`)
    diga_layer: int = 8  # hidden states "after layer l" (1-based count of decoder layers)
    diga_mult: int = 4
    zero_init: bool = True  # last layer starts at zero (keeps a pretrained decoder's start); off when from scratch


@dataclass
class TokenConfig:
    """Special-token ids. Come from the tokenizer; never hard-coded in model code."""

    bos: int = 151644  # <|im_start|>
    eos: int = 151645  # <|im_end|>
    vision_start: int = 151652  # <|vision_start|>
    vision_end: int = 151653  # <|vision_end|>


#####################################################################################################
# The whole network
#####################################################################################################


WEIGHT_INITS = ("normal", "fan_in")


@dataclass
class UniGenDetConfig:
    name: str = "custom"
    mot: MoTConfig = field(default_factory=MoTConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    head: DetHeadConfig = field(default_factory=DetHeadConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    latent_to_vit_connector: bool = True  # unused by the method; kept so checkpoints round-trip
    weight_init: str = "normal"
    """Fresh Linear weights: ``"normal"`` = normal(0, 0.02) everywhere (Qwen2 / BAGEL's value, sized for widths of
    ~1000+); ``"fan_in"`` = normal(0, 1/sqrt(fan_in)) per Linear, for narrow models trained from scratch, where 0.02
    leaves every residual branch small and nearly linear (the ``demo`` preset; see BENCHMARKS.md)."""

    def __post_init__(self) -> None:
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {self.weight_init!r}")
        for key, cls in _COMPONENTS.items():
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, cls(**value))
        if not 1 <= self.head.diga_layer <= self.mot.n_layers and self.head.diga:
            raise ValueError(f"diga_layer {self.head.diga_layer} outside 1..{self.mot.n_layers}")
        ids = dataclasses.asdict(self.tokens)
        bad = {k: v for k, v in ids.items() if not 0 <= v < self.mot.vocab_size}
        if bad:
            raise ValueError(f"special token ids {bad} outside the vocabulary of {self.mot.vocab_size}")

    # ----------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def latent_token_dim(self) -> int:
        """Numbers per VAE token: latent_patch_size**2 * z_channels (64 for BAGEL)."""
        return self.flow.latent_patch_size**2 * self.vae.z_channels

    @property
    def vae_pixels_per_token(self) -> int:
        """Side in pixels covered by one VAE token (16 for BAGEL)."""
        return self.flow.latent_patch_size * self.vae.downsample

    @property
    def max_image_side(self) -> int:
        """The largest image side, in pixels, the model can generate (its latent position table)."""
        return self.flow.max_latent_size * self.vae_pixels_per_token

    def check_image_size(self, height: int, width: int, what: str = "image size") -> None:
        """ValueError unless the model can generate ``height`` x ``width`` px: multiples of one latent token's side,
        at most :attr:`max_image_side` per side."""
        unit = self.vae_pixels_per_token
        if height % unit or width % unit:
            raise ValueError(f"{what} {height}x{width} px: height and width must be multiples of {unit} px (one "
                             "latent token)")
        if max(height, width) > self.max_image_side:
            raise ValueError(f"{what} {height}x{width} px exceeds what the {self.name} model generates: at most "
                             f"{self.max_image_side} px per side")

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> UniGenDetConfig:
        """A named preset with overrides: ``from_name("tiny", mot={"n_layers": 3})`` or flat ``n_layers=3``.

        Flat keys are looked up in the components; ``n_layers`` means the decoder's; any other flat key that
        several components share (``dim``, ``n_heads``, ``mlp_dim``) is ambiguous and must be given nested.
        """
        from unigendet.model.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        base = copy.deepcopy(PRESETS[name])
        base["name"] = name
        return cls.from_dict(_merge(base, _nest(overrides)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UniGenDetConfig:
        d = dict(d)
        kwargs = {k: _COMPONENTS[k](**d.pop(k)) for k in list(d) if k in _COMPONENTS}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown UniGenDetConfig keys {sorted(unknown)}")
        return cls(**kwargs, **d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict[str, Any] | None) -> UniGenDetConfig:
        """A copy with nested (or flat, as in :meth:`from_name`) overrides applied, validated again."""
        if not overrides:
            return self
        return type(self).from_dict(_merge(self.to_dict(), _nest(dict(overrides))))


_COMPONENTS = {
    "mot": MoTConfig,
    "vit": ViTConfig,
    "vae": VAEConfig,
    "flow": FlowConfig,
    "head": DetHeadConfig,
    "tokens": TokenConfig,
}


# flat keys that several components share but that conventionally mean the decoder's
_FLAT_PREFERRED = {"n_layers": "mot"}


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in _COMPONENTS or key in ("name", "latent_to_vit_connector", "weight_init"):
            out[key] = value
            continue
        owners = [c for c, cls in _COMPONENTS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if key in _FLAT_PREFERRED:
            owners = [_FLAT_PREFERRED[key]]
        if len(owners) != 1:
            raise ValueError(f"override {key!r} matches components {owners}; pass it nested, e.g. "
                             f"{{'{owners[0] if owners else 'mot'}': {{'{key}': ...}}}}")
        out.setdefault(owners[0], {})[key] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(dict(base[key]), value)
        else:
            base[key] = value
    return base


class PresetOrFolder(str):
    """A preset name or a BAGEL / UniGenDet model folder; anything else fails at once, naming the presets. As a
    command-line type (registered by ``unigendet.cli``) a typo fails while the config is parsed."""

    def __new__(cls, value: str) -> PresetOrFolder:
        from unigendet.model.presets import PRESETS

        value = str(value)
        if value not in PRESETS and not Path(value).expanduser().is_dir():
            raise ValueError(f"unknown preset {value!r} (and no such model folder); presets: "
                             f"{', '.join(sorted(PRESETS))}")
        return super().__new__(cls, value)


#####################################################################################################
# Typed overrides of a preset
#####################################################################################################


def _optional_fields(cls: type, name: str) -> type:
    """A dataclass with ``cls``'s fields, each optional and None by default (None: keep the preset's value)."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(cls)]  # noqa: UP045
    out = dataclasses.make_dataclass(name, fields)
    out.__module__ = __name__
    out.__doc__ = f"Overrides of :class:`{cls.__name__}`: fields left None keep the preset's value."
    return out


MoTOverrides = _optional_fields(MoTConfig, "MoTOverrides")
ViTOverrides = _optional_fields(ViTConfig, "ViTOverrides")
VAEOverrides = _optional_fields(VAEConfig, "VAEOverrides")
FlowOverrides = _optional_fields(FlowConfig, "FlowOverrides")
DetHeadOverrides = _optional_fields(DetHeadConfig, "DetHeadOverrides")
TokenOverrides = _optional_fields(TokenConfig, "TokenOverrides")


@dataclass
class ModelOverrides:
    """Overrides of a preset's components, e.g. ``{mot: {n_layers: 4}, head: {diga_layer: 2}}``; unset fields keep
    the preset's values. ``to_dict()`` gives the nested dict :meth:`UniGenDetConfig.from_name` takes."""

    mot: MoTOverrides | None = None
    vit: ViTOverrides | None = None
    vae: VAEOverrides | None = None
    flow: FlowOverrides | None = None
    head: DetHeadOverrides | None = None
    tokens: TokenOverrides | None = None
    latent_to_vit_connector: bool | None = None
    weight_init: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ModelOverrides:
        """From a nested (or flat, as :meth:`UniGenDetConfig.from_name` takes) dict; unknown keys are an error."""
        nested = _nest(dict(d or {}))
        unknown = set(nested) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model override keys {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in nested.items():
            if key in _COMPONENTS:
                comp = _OVERRIDE_CLASSES[key]
                known = {f.name for f in dataclasses.fields(comp)}
                if set(value) - known:
                    raise ValueError(f"unknown {key} override keys {sorted(set(value) - known)}; known: "
                                     f"{sorted(known)}")
                value = comp(**value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, nested: ``{"mot": {"n_layers": 4}}``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if dataclasses.is_dataclass(value):
                value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
                if not value:
                    continue
            out[f.name] = value
        return out


_OVERRIDE_CLASSES = {"mot": MoTOverrides, "vit": ViTOverrides, "vae": VAEOverrides, "flow": FlowOverrides,
                     "head": DetHeadOverrides, "tokens": TokenOverrides}
