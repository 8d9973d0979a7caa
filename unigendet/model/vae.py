"""The frozen autoencoder that maps images to the latent space of the generation expert.

Three implementations share one interface, :class:`Autoencoder`, and are picked by ``VAEConfig.kind``:

* :class:`FluxAutoencoder` (``"flux"``) - the FLUX.1 AutoEncoder that BAGEL uses
  (https://github.com/black-forest-labs/flux, itself the LDM KL-autoencoder, https://arxiv.org/abs/2112.10752):
  - conv encoder/decoder of ResNet blocks (GroupNorm(32, eps=1e-6) -> swish -> conv3x3, twice, plus a 1x1
    ``nin_shortcut`` when the width changes), one single-head self-attention block in the middle of each;
  - the downsampler pads (0, 1, 0, 1) with zeros before a stride-2 conv3x3 (asymmetric, like the original);
    the upsampler is nearest x2 then conv3x3;
  - the encoder outputs ``2 * z_channels`` channels, the mean and log-variance of a diagonal Gaussian;
  - latents are normalised as ``z = scale_factor * (latent - shift_factor)`` (values from ``VAEConfig``);
  - module names equal the BFL ``ae.safetensors`` keys (``encoder.down.{i}.block.{j}.conv1.weight``, ...), so
    ``load_state_dict(strict=True)`` loads the released file as is.
* :class:`PixelAutoencoder` (``"pixel"``) - no parameters: an exactly invertible space-to-depth map, for tests and
  for generation in pixel space without any AE.
* :class:`ConvAutoencoder` (``"conv"``) - the CPU demo's small learned AE; trained once on the corpus before the
  model (``unigendet train-ae``, :mod:`unigendet.training.autoencoder`), because nothing pretrained can be downloaded.

Images are (B, C, H, W) in [-1, 1]. The AE is never trained with the model: :func:`build_autoencoder` returns it
with ``requires_grad_(False)``. Gradients still flow to the *input* of encode/decode when the caller needs them.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unigendet.model.config import VAEConfig

# Clamp range of the log-variance before sampling (the LDM DiagonalGaussianDistribution's); the FLUX weights
# never reach it, so this only guards exp() against overflow.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0

#####################################################################################################
# Interface
#####################################################################################################


class Autoencoder(nn.Module, abc.ABC):
    """Common interface of the frozen autoencoders.

    Attributes:
        cfg: the ``VAEConfig`` the AE was built from.
        scale_factor: multiplies the shifted latent, ``z = scale_factor * (latent - shift_factor)``.
        shift_factor: subtracted from the raw latent before scaling.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale_factor = float(cfg.scale_factor)
        self.shift_factor = float(cfg.shift_factor)

    @property
    def z_channels(self) -> int:
        """Channels of a latent pixel."""
        return self.cfg.z_channels

    @property
    def downsample(self) -> int:
        """Side of the pixel block that one latent pixel covers."""
        return self.cfg.downsample

    def normalize(self, latent: Tensor) -> Tensor:
        """Raw latent -> normalised latent ``z`` that the flow model sees."""
        return self.scale_factor * (latent - self.shift_factor)

    def denormalize(self, z: Tensor) -> Tensor:
        """Normalised latent ``z`` -> raw latent that the decoder takes."""
        return z / self.scale_factor + self.shift_factor

    def _check(self, x: Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, H, W), got {tuple(x.shape)}")

    def _check_images(self, x: Tensor) -> None:
        """Images of ``in_channels`` channels whose sides are multiples of ``downsample`` (the space-to-depth AEs)."""
        self._check(x, self.cfg.in_channels, "images")
        d = self.downsample
        if x.shape[-2] % d or x.shape[-1] % d:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of downsample={d}")

    @abc.abstractmethod
    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior of the raw (un-normalised) latent.

        Args:
            x: images (B, C, H, W) in [-1, 1].

        Returns:
            ``(mean, logvar)``, each (B, z_channels, H / downsample, W / downsample).
        """

    @abc.abstractmethod
    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images -> normalised latents ``z`` (B, z_channels, H / downsample, W / downsample).

        Args:
            x: images (B, C, H, W) in [-1, 1].
            sample: draw from the posterior instead of taking its mean.
            generator: random generator for ``sample=True``.
        """

    @abc.abstractmethod
    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, z_channels, h, w) -> images (B, C, h * downsample, w * downsample)."""

    @abc.abstractmethod
    def init_weights(self) -> None:
        """(Re-)initialise every parameter; idempotent, and valid after ``to_empty`` from the meta device."""

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``decode(encode(x))`` with the posterior mean; (B, C, H, W) -> (B, C, H, W)."""
        return self.decode(self.encode(x))


#####################################################################################################
# FLUX building blocks
#####################################################################################################


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-norm residual block: (GroupNorm -> swish -> conv3x3) x 2, with a 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # nn.Identity has no parameters, so the key exists only when the widths differ (as in ae.safetensors)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (scale 1/sqrt(C)), 1x1-conv projections, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)

        def to_seq(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1, H*W, C)
            return t.reshape(B, 1, C, H * W).transpose(-1, -2)

        q, k, v = to_seq(self.q(h)), to_seq(self.k(h)), to_seq(self.v(h))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.transpose(-1, -2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a stride-2 conv3x3 without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then conv3x3 (padding 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class MidBlock(nn.Module):
    """ResNet block -> attention -> ResNet block at the lowest resolution (names ``block_1``/``attn_1``/``block_2``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` (a list of ResNet blocks) and an optional ``downsample``/``upsample``."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, resample: str | None) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * n_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(n_blocks))
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


#####################################################################################################
# FLUX encoder / decoder
#####################################################################################################


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> moments (B, 2 * z_channels, H / 2**(L-1), W / 2**(L-1)), L = len(ch_mult)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, mult, n_levels = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        in_mult = (1, *mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            Level(ch * in_mult[i], ch * mult[i], cfg.num_res_blocks, "down" if i < n_levels - 1 else None)
            for i in range(n_levels)
        )
        width = ch * mult[-1]
        self.mid = MidBlock(width)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * cfg.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch * mult[i], H / 2**i', W / 2**i')
        h = self.mid(h)  # (B, ch * mult[-1], h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 * z, h, w)


class Decoder(nn.Module):
    """Raw latents (B, z_channels, h, w) -> images (B, out_ch, h * 2**(L-1), w * 2**(L-1)).

    ``up`` is indexed by level like the encoder's ``down`` (``up.0`` is the full-resolution level), but it runs
    from the last level to the first. Level i has ``num_res_blocks + 1`` blocks and, except level 0, an upsampler.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, mult, n_levels = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        width = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, width, kernel_size=3, padding=1)
        self.mid = MidBlock(width)
        # level i takes the output width of level i+1 (or the mid width for the last level)
        in_widths = [ch * mult[i + 1] for i in range(n_levels - 1)] + [width]
        self.up = nn.ModuleList(
            Level(in_widths[i], ch * mult[i], cfg.num_res_blocks + 1, "up" if i > 0 else None)
            for i in range(n_levels)
        )
        self.norm_out = _group_norm(ch * mult[0])
        self.conv_out = nn.Conv2d(ch * mult[0], cfg.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)  # (B, ch * mult[i], ...), doubled in size except at level 0
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H, W)


class FluxAutoencoder(Autoencoder):
    """The FLUX.1 KL-autoencoder; ``state_dict`` keys are exactly those of BFL's ``ae.safetensors``."""

    def __init__(self, cfg: VAEConfig) -> None:
        if cfg.kind != "flux":
            raise ValueError(f"FluxAutoencoder needs VAEConfig.kind='flux', got {cfg.kind!r}")
        super().__init__(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        moments = self.encoder(x)  # (B, 2 * z, h, w)
        mean, logvar = moments.chunk(2, dim=1)  # (B, z, h, w) each
        return mean, logvar

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        mean, logvar = self.encode_moments(x)  # (B, z, h, w)
        latent = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latent = mean + std * noise
        return self.normalize(latent)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.denormalize(z))  # (B, out_ch, H, W)

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default init for every conv and GroupNorm, which is what FLUX trains from."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
                module.reset_parameters()


#####################################################################################################
# Pixel-space stand-in
#####################################################################################################


class PixelAutoencoder(Autoencoder):
    """Parameter-free space-to-depth "autoencoder"; ``decode(encode(x)) == x`` exactly (up to float rounding
    of the scale/shift, which is exact for the powers of two the presets use).

    A ``downsample x downsample`` block of ``C`` channels becomes one latent pixel of ``z_channels = d**2 * C``
    numbers, in ``F.pixel_unshuffle`` order: channel index ``c * d**2 + p * d + q`` for pixel row ``p`` and column
    ``q`` of the block. The posterior is a point mass: ``encode_moments`` returns ``logvar`` filled with
    ``LOGVAR_MIN`` (the clamp floor, i.e. a standard deviation of ~3e-7), and ``encode`` ignores ``sample``.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        if cfg.kind != "pixel":
            raise ValueError(f"PixelAutoencoder needs VAEConfig.kind='pixel', got {cfg.kind!r}")
        if cfg.in_channels != cfg.out_ch:
            raise ValueError(f"pixel AE needs in_channels == out_ch, got {cfg.in_channels} and {cfg.out_ch}")
        super().__init__(cfg)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_images(x)
        mean = F.pixel_unshuffle(x, self.downsample)  # (B, C * d * d, H / d, W / d)
        return mean, torch.full_like(mean, LOGVAR_MIN)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        mean, _ = self.encode_moments(x)
        return self.normalize(mean)  # (B, z, h, w)

    def decode(self, z: Tensor) -> Tensor:
        self._check(z, self.z_channels, "latents")
        return F.pixel_shuffle(self.denormalize(z), self.downsample)  # (B, C, h * d, w * d)

    def init_weights(self) -> None:
        """No parameters: nothing to do."""


class ConvAutoencoder(Autoencoder):
    """The CPU demo's small learned autoencoder (``"conv"``), trained on a corpus by ``unigendet train-ae``
    (:mod:`unigendet.training.autoencoder`).

    Encoder: space-to-depth by ``downsample``, two 3x3 convolutions of width ``ch`` and a 1x1 projection to
    ``z_channels``. Decoder: a 1x1 convolution and two 3x3 convolutions at the latent resolution, then per octave a
    bilinear x2 up-sampling and a 3x3 convolution (halving the width, at least :data:`FINE`), and a last 3x3
    convolution to RGB. Every output pixel sees the neighbouring latent pixels, so the tokens a generator makes one by
    one blend at their borders instead of meeting as hard blocks. The
    posterior is a point mass (``encode`` ignores ``sample``); training folds the latent normalisation into the 1x1
    layers, so the config's ``scale_factor`` / ``shift_factor`` stay 1 / 0.
    """

    FINE = 8  # the narrowest width of the up-sampling path

    def __init__(self, cfg: VAEConfig) -> None:
        if cfg.kind != "conv":
            raise ValueError(f"ConvAutoencoder needs VAEConfig.kind='conv', got {cfg.kind!r}")
        if cfg.downsample & (cfg.downsample - 1):
            raise ValueError(f"the conv AE up-samples by octaves: downsample must be a power of two, got "
                             f"{cfg.downsample}")
        super().__init__(cfg)
        d, w, z = cfg.downsample, cfg.ch, cfg.z_channels
        self.encoder = nn.Sequential(nn.Conv2d(cfg.in_channels * d * d, w, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, z, 1))
        layers: list[nn.Module] = [nn.Conv2d(z, w, 1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
                                   nn.Conv2d(w, w, 3, padding=1), nn.SiLU()]
        width = w
        for _ in range(int(math.log2(d))):  # bilinear x2 + conv3x3 per octave: no hard cell or token borders
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(width, max(width // 2, self.FINE), 3, padding=1), nn.SiLU()]
            width = max(width // 2, self.FINE)
        self.decoder = nn.Sequential(*layers, nn.Conv2d(width, cfg.out_ch, 3, padding=1))

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_images(x)
        mean = self.encoder(F.pixel_unshuffle(x, self.downsample))  # (B, z, H / d, W / d)
        return mean, torch.full_like(mean, LOGVAR_MIN)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        return self.normalize(self.encode_moments(x)[0])

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.denormalize(z))  # (B, out_ch, h * d, w * d)

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default convolution init (what ``unigendet train-ae`` starts from)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()

    @torch.no_grad()
    def fold_normalisation(self, mean: Tensor, std: Tensor) -> None:
        """Make the encoder output ``(latent - mean) / std`` per channel and the decoder take it: exact, since both
        ends are 1x1 convolutions (``mean``, ``std``: ``(z_channels,)``)."""
        enc, dec = self.encoder[-1], self.decoder[0]
        enc.bias.sub_(mean).div_(std)
        enc.weight.div_(std[:, None, None, None])
        dec.bias.add_(dec.weight[:, :, 0, 0] @ mean)
        dec.weight.mul_(std[None, :, None, None])


#####################################################################################################
# Factory
#####################################################################################################


def build_autoencoder(cfg: VAEConfig) -> Autoencoder:
    """Build the AE that ``cfg.kind`` names, frozen (``requires_grad_(False)``).

    Works under ``torch.device("meta")``; then ``to_empty(device=...)`` and ``init_weights()`` or
    ``load_state_dict(...)`` with BFL key names (``encoder.*``, ``decoder.*``).
    """
    classes: dict[str, type[Autoencoder]] = {"flux": FluxAutoencoder, "pixel": PixelAutoencoder,
                                             "conv": ConvAutoencoder}
    if cfg.kind not in classes:
        raise ValueError(f"unknown VAE kind {cfg.kind!r} (expected one of {sorted(classes)})")
    return classes[cfg.kind](cfg).requires_grad_(False)
