"""Attention over packed sequences: the mask rules of docs/method.md, "Packed sequences" and two kernels that obey them.

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
    """Per-token ids of a packed sequence. ``index`` is each token's position in the ORIGINAL (packed) order, which
    the causal rule compares; tokens may be listed in any order (``select``), and a KV cache's layout can be
    concatenated with the layout of new tokens (``cat``) as long as new tokens get larger indexes and splits."""

    sample: Tensor  # (T,) sample index
    split: Tensor  # (T,) global split index, increasing along the sequence
    mode: Tensor  # (T,) mode of the token's split (CAUSAL / FULL / NOISE)
    index: Tensor | None = None  # (T,) original position; arange(T) when None

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = torch.arange(self.sample.numel(), device=self.sample.device)

    def select(self, rows: Tensor) -> SequenceLayout:
        return SequenceLayout(self.sample[rows], self.split[rows], self.mode[rows], self.index[rows])

    @staticmethod
    def cat(layouts: list[SequenceLayout]) -> SequenceLayout:
        return SequenceLayout(*(torch.cat([getattr(x, f) for x in layouts]) for f in ("sample", "split", "mode",
                                                                                          "index")))

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
    """Which key may each query see. Queries are the tokens of ``layout`` in the order ``order`` (order[i] = row of
    the layout for query i; identity when None); keys are the same tokens, or ``kv`` (e.g. a KV cache's tokens
    followed by the new ones)."""

    def __init__(self, layout: SequenceLayout, order: Tensor | None = None, kv: SequenceLayout | None = None) -> None:
        self.q = layout if order is None else layout.select(order)
        self.kv = self.q if kv is None else kv
        self.n_q, self.n_kv = len(self.q), len(self.kv)
        self._dense: Tensor | None = None
        self._block = None
        self._samples: list[tuple[Tensor, Tensor, Tensor]] | None = None

    @staticmethod
    def _rule(q: SequenceLayout, k: SequenceLayout) -> Tensor:
        return allowed(q.index[:, None], k.index[None, :], q.sample[:, None], k.sample[None, :], q.split[:, None],
                       k.split[None, :], q.mode[:, None], k.mode[None, :])

    def dense(self) -> Tensor:
        """(n_q, n_kv) bool, True = may attend."""
        if self._dense is None:
            self._dense = self._rule(self.q, self.kv)
        return self._dense

    def sample_blocks(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per sample: (its query rows, its key columns, their bool mask). Attention never crosses samples, so
        running it per sample costs sum(Lq * Lk) instead of n_q * n_kv."""
        if self._samples is None:
            n = int(max(self.q.sample.max(), self.kv.sample.max())) + 1 if self.n_q and self.n_kv else 0
            q_rows, k_cols = (torch.argsort(t.sample, stable=True).split(torch.bincount(t.sample, minlength=n).tolist())
                              for t in (self.q, self.kv))
            self._samples = [(rows, cols, self._rule(self.q.select(rows), self.kv.select(cols)))
                             for rows, cols in zip(q_rows, k_cols, strict=True) if rows.numel()]
        return self._samples

    def mask_mod(self):
        q, k = self.q, self.kv

        def mod(b, h, qi, ki):
            return allowed(q.index[qi], k.index[ki], q.sample[qi], k.sample[ki], q.split[qi], k.split[ki],
                           q.mode[qi], k.mode[ki])

        return mod

    def block_mask(self, block_size: int = 128):
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            self._block = create_block_mask(self.mask_mod(), None, None, self.n_q, self.n_kv,
                                            device=self.q.sample.device, BLOCK_SIZE=block_size)
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
    """q: (Nq, H, hd), k/v: (Nk, Hkv, hd) -> (Nq, H * hd). GQA when Hkv < H. Scale 1/sqrt(hd)."""
    backend = resolve_backend(backend, q.device)
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, hd)
    gqa = kh.shape[1] != qh.shape[1]
    if backend == "sdpa":  # one SDPA call per sample, each with its own small dense mask
        blocks = mask.sample_blocks()
        if len(blocks) == 1 and blocks[0][0].numel() == mask.n_q and blocks[0][1].numel() == mask.n_kv:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.dense(), enable_gqa=gqa)
        else:
            out = qh.new_zeros(qh.shape)
            for rows, cols, block in blocks:
                out[:, :, rows] = F.scaled_dot_product_attention(qh[:, :, rows], kh[:, :, cols], vh[:, :, cols],
                                                                 attn_mask=block, enable_gqa=gqa)
    elif backend == "sdpa_dense":  # one SDPA call over everything with an (Nq, Nk) mask
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.dense(), enable_gqa=gqa)
    else:
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled_flex() if backend == "flex" else flex_attention
        out = fn(qh, kh, vh, block_mask=mask.block_mask(), enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1).reshape(q.shape[0], -1)
