"""Heads and adapters around the decoder.

* ``TimestepEmbedder`` - DiT: 256-d sinusoid of t -> Linear -> SiLU -> Linear (t in [0, 1], not scaled)
* ``DetectionHead``    - real/fake head: LayerNorm -> Linear(D, D/4) -> ReLU -> Linear(D/4, 2); class 0 = fake
* ``DigaProjector``    - DIGA student projector: Linear(D, 4D) -> GELU(erf) -> Linear(4D, D)
* ``vae2llm`` / ``llm2vae`` are plain Linears built in ``unigendet.py``; ``llm2vae`` (the velocity head) and the
  last layer of the detection head start at zero so a pretrained decoder starts unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from unigendet.model.config import DetHeadConfig
from unigendet.model.layers import MLP2, timestep_sinusoid


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = MLP2(freq_dim, dim, dim, "silu")

    def forward(self, t: Tensor) -> Tensor:  # (N,) -> (N, D)
        return self.mlp(timestep_sinusoid(t, self.freq_dim).to(self.mlp.fc1.weight.dtype))


class DetectionHead(nn.Module):
    def __init__(self, dim: int, cfg: DetHeadConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(dim, dim // cfg.reduction)
        self.fc2 = nn.Linear(dim // cfg.reduction, cfg.n_classes)

    def forward(self, h: Tensor) -> Tensor:  # (N, D) -> (N, n_classes)
        return self.fc2(self.fc1(self.norm(h)).relu())


class DigaProjector(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.mlp = MLP2(dim, mult * dim, dim, "gelu")

    def forward(self, h: Tensor) -> Tensor:  # (N, D) -> (N, D)
        return self.mlp(h)
