"""Building blocks shared by the decoder, the ViT and the heads.

* ``RMSNorm``            - Qwen2 RMSNorm (statistics in fp32, weight applied in the input dtype)
* ``rotary_cos_sin`` / ``apply_rotary`` - HF "rotate-half" RoPE; cos/sin computed once per forward
* ``SwiGLU``             - Qwen2 MLP: down(silu(gate(x)) * up(x))
* ``MLP2``               - Linear -> activation -> Linear (ViT MLP, connector, timestep embedder, DIGA projector)
* ``PosEmbed2D``         - a fixed 2-D sin-cos table looked up by flattened (row * side + col) ids
* ``timestep_sinusoid``  - DiT-style frequency embedding of t
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#####################################################################################################
# Normalisation and activations
#####################################################################################################


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:  # (..., D)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


_ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}

# names used by HF configs -> ours
ACT_ALIASES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "swish": "silu"}


def activation(name: str):
    name = ACT_ALIASES.get(name, name)
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


#####################################################################################################
# Rotary position embedding
#####################################################################################################


def rotary_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for the given positions: two (T, head_dim) tensors (HF layout: frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float()
                                / head_dim))
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (T, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (T, H, head_dim); cos/sin: (T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


#####################################################################################################
# MLPs
#####################################################################################################


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "silu") -> None:
        super().__init__()
        self.act = activation(act)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (T, D)
        return self.down(self.act(self.gate(x)) * self.up(x))


class MLP2(nn.Module):
    """Linear -> act -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        self.act_name = act
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


#####################################################################################################
# Fixed embeddings
#####################################################################################################


def sincos_2d_table(dim: int, side: int) -> Tensor:
    """MAE-style 2-D sin-cos table (side*side, dim): first half encodes the column, second half the row."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(side, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_axis(col), one_axis(row)], dim=1).float()


class PosEmbed2D(nn.Module):
    """A non-trainable (side*side, dim) table, initialised as sin-cos, loaded from checkpoints as stored."""

    def __init__(self, dim: int, side: int) -> None:
        super().__init__()
        self.dim, self.side = dim, side
        self.table = nn.Parameter(torch.empty(side * side, dim), requires_grad=False)

    def init_weights(self) -> None:
        with torch.no_grad():
            self.table.copy_(sincos_2d_table(self.dim, self.side))

    def forward(self, position_ids: Tensor) -> Tensor:  # (N,) -> (N, D)
        return self.table[position_ids]


def timestep_sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DiT frequency embedding: [cos(t f), sin(t f)] with f = max_period ** (-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
