"""Attention over packed sequences: the mask rules of METHOD.md section 2 and two kernels that obey them.

* ``SequenceLayout``  - per-token sample / split / mode ids derived from (sample lens, split lens, modes)
* ``allowed``         - THE mask rule, written once as elementwise tensor logic; the dense mask, the flex
                        ``mask_mod`` and the tests' brute-force check all call it
* ``AttentionMask``   - a layout viewed in some token order (the decoder runs its tokens sorted by expert),
                        turned into a dense bool mask (SDPA, any device) or a FlexAttention ``BlockMask`` (CUDA)
* ``attend``          - (T, H, hd) q with (T, Hkv, hd) k/v -> (T, H*hd), GQA, with one of the kernels:
                        ``sdpa`` (one SDPA call per sample, any device: sum(L^2) work), ``sdpa_dense`` (one call,
                        (T, T) mask), ``flex`` (compiled block-sparse FlexAttention, CUDA) or ``flex_eager``
                        (uncompiled FlexAttention: a CPU forward check; it has no CPU backward)

Rules: tokens never see other samples; a split sees every earlier split of its sample except ``noise`` splits
(which nobody else sees); inside a split ``causal`` is lower-triangular, ``full``/``noise`` bidirectional.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = {"causal": 0, "full": 1, "noise": 2}
CAUSAL, FULL, NOISE = 0, 1, 2

#####################################################################################################
# Layout
#####################################################################################################


@dataclass
class SequenceLayout:
    """Per-token ids of a packed sequence, in the original (packed) token order."""

    sample: Tensor  # (T,) sample index
    split: Tensor  # (T,) global split index, increasing along the sequence
    mode: Tensor  # (T,) mode of the token's split (CAUSAL / FULL / NOISE)

    @classmethod
    def build(cls, sample_lens: list[int], split_lens: list[int], split_modes: list[str],
              device: torch.device | str = "cpu") -> SequenceLayout:
        if sum(sample_lens) != sum(split_lens):
            raise ValueError(f"sample lens sum to {sum(sample_lens)} but split lens to {sum(split_lens)}")
        if len(split_lens) != len(split_modes):
            raise ValueError("one attention mode per split is required")
        unknown = set(split_modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown attention modes {sorted(unknown)}; expected {sorted(MODES)}")
        lens = torch.tensor(split_lens, dtype=torch.long)
        if (lens <= 0).any() or min(sample_lens, default=1) <= 0:
            raise ValueError(f"empty splits or samples are not allowed (split lens {split_lens})")
        split = torch.repeat_interleave(torch.arange(len(split_lens)), lens)
        mode = torch.repeat_interleave(torch.tensor([MODES[m] for m in split_modes]), lens)
        sample = torch.repeat_interleave(torch.arange(len(sample_lens)), torch.tensor(sample_lens, dtype=torch.long))
        # every split must lie inside one sample
        starts = torch.cumsum(lens, 0) - lens
        if (sample[starts] != sample[starts + lens - 1]).any():
            raise ValueError("a split crosses a sample boundary")
        return cls(sample.to(device), split.to(device), mode.to(device))

    @classmethod
    def documents(cls, seqlens: Tensor) -> SequenceLayout:
        """Independent full-attention documents (ViT images): one sample and one split each."""
        doc = torch.repeat_interleave(torch.arange(len(seqlens), device=seqlens.device), seqlens)
        return cls(doc, doc, torch.full_like(doc, FULL))

    def __len__(self) -> int:
        return self.sample.numel()


def allowed(q_pos: Tensor, k_pos: Tensor, q_sample: Tensor, k_sample: Tensor, q_split: Tensor, k_split: Tensor,
            q_mode: Tensor, k_mode: Tensor) -> Tensor:
    """May query token q attend to key token k? Positions are ORIGINAL packed indexes. Broadcasts."""
    same_split = q_split == k_split
    inside = same_split & ((q_mode != CAUSAL) | (k_pos <= q_pos))
    earlier = (k_split < q_split) & (k_mode != NOISE)
    return (q_sample == k_sample) & (inside | earlier)


#####################################################################################################
# Masks in an arbitrary token order
#####################################################################################################


class AttentionMask:
    """The mask of ``layout`` for tokens taken in the order ``order`` (order[i] = original index of token i)."""

    def __init__(self, layout: SequenceLayout, order: Tensor | None = None) -> None:
        n = len(layout)
        self.order = torch.arange(n, device=layout.sample.device) if order is None else order
        self.sample = layout.sample[self.order]
        self.split = layout.split[self.order]
        self.mode = layout.mode[self.order]
        self.n = n
        self._dense: Tensor | None = None
        self._block = None
        self._samples: list[tuple[Tensor, Tensor]] | None = None

    def dense(self) -> Tensor:
        """(T, T) bool, True = may attend."""
        if self._dense is None:
            o, s, p, m = self.order, self.sample, self.split, self.mode
            self._dense = allowed(o[:, None], o[None, :], s[:, None], s[None, :], p[:, None], p[None, :],
                                  m[:, None], m[None, :])
        return self._dense

    def sample_blocks(self) -> list[tuple[Tensor, Tensor]]:
        """Per sample: (its token rows in this order, its (L, L) bool mask). Attention never crosses samples, so
        running it per sample costs sum(L^2) instead of T^2."""
        if self._samples is None:
            blocks = []
            dense_rows = torch.argsort(self.sample, stable=True)
            counts = torch.bincount(self.sample).tolist()
            for rows in dense_rows.split(counts):
                if rows.numel() == 0:
                    continue
                o, p, m = self.order[rows], self.split[rows], self.mode[rows]
                s = self.sample[rows]
                mask = allowed(o[:, None], o[None, :], s[:, None], s[None, :], p[:, None], p[None, :],
                               m[:, None], m[None, :])
                blocks.append((rows, mask))
            self._samples = blocks
        return self._samples

    def mask_mod(self):
        o, s, p, m = self.order, self.sample, self.split, self.mode

        def mod(b, h, q, k):
            return allowed(o[q], o[k], s[q], s[k], p[q], p[k], m[q], m[k])

        return mod

    def block_mask(self, block_size: int = 128):
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            self._block = create_block_mask(self.mask_mod(), None, None, self.n, self.n,
                                            device=self.order.device, BLOCK_SIZE=block_size)
        return self._block


#####################################################################################################
# Kernels
#####################################################################################################


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


BACKENDS = ("sdpa", "sdpa_dense", "flex", "flex_eager")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected auto or one of {BACKENDS}")
    return backend


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, backend: str = "auto") -> Tensor:
    """q: (T, H, hd), k/v: (T, Hkv, hd) -> (T, H * hd). GQA when Hkv < H. Scale 1/sqrt(hd)."""
    backend = resolve_backend(backend, q.device)
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, T, hd)
    gqa = kh.shape[1] != qh.shape[1]
    if backend == "sdpa":  # one SDPA call per sample, each with its own small dense mask
        blocks = mask.sample_blocks()
        if len(blocks) == 1:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.dense(), enable_gqa=gqa)
        else:
            out = torch.empty_like(qh)
            for rows, block in blocks:
                out[:, :, rows] = F.scaled_dot_product_attention(qh[:, :, rows], kh[:, :, rows], vh[:, :, rows],
                                                                 attn_mask=block, enable_gqa=gqa)
    elif backend == "sdpa_dense":  # one SDPA call over the whole sequence with a (T, T) mask
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.dense(), enable_gqa=gqa)
    else:
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled_flex() if backend == "flex" else flex_attention
        out = fn(qh, kh, vh, block_mask=mask.block_mask(), enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1).reshape(q.shape[0], -1)
