"""Tests of unigendet.model.attention: the packed-sequence mask rules (docs/method.md, "Packed sequences") and both
kernels.

The reference mask here is written independently of ``allowed``: plain Python loops that build each sample's
mask the way the authors' ``prepare_attention_mask_per_sample`` does (every split's rows see all earlier columns
of the sample and the split itself, lower-triangular when causal; then each ``noise`` split's columns are
cleared for every row of the sample outside the split).
"""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import parity_fixture_dirs
from unigendet.model.attention import AttentionMask, SequenceLayout, attend

FIXTURES = parity_fixture_dirs()
NO_FIXTURE = "no parity fixture: set UNIGENDET_PARITY_FIXTURES or provide ../shared/fixtures/parity_*"
MODES = ("causal", "full", "noise")

# flex_attention without torch.compile warns once that it materialises the scores; that is what we want on CPU
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


#####################################################################################################
# Helpers
#####################################################################################################


def reference_mask(samples: list[list[tuple[int, str]]]) -> torch.Tensor:
    """Brute-force (T, T) bool mask. ``samples`` is a list of samples, each a list of (split_len, mode)."""
    total = sum(n for sample in samples for n, _ in sample)
    mask = [[False] * total for _ in range(total)]
    base = 0
    for sample in samples:
        length = sum(n for n, _ in sample)
        local = [[False] * length for _ in range(length)]
        start = 0
        for n, mode in sample:
            for i in range(start, start + n):
                for j in range(start):
                    local[i][j] = True
                for j in range(start, start + n):
                    local[i][j] = mode != "causal" or j <= i
            start += n
        start = 0
        for n, mode in sample:
            if mode == "noise":
                for i in range(length):
                    if start <= i < start + n:
                        continue
                    for j in range(start, start + n):
                        local[i][j] = False
            start += n
        for i in range(length):
            for j in range(length):
                mask[base + i][base + j] = local[i][j]
        base += length
    return torch.tensor(mask, dtype=torch.bool).reshape(total, total)


def layout_of(samples: list[list[tuple[int, str]]]) -> SequenceLayout:
    return SequenceLayout.build([sum(n for n, _ in s) for s in samples], [n for s in samples for n, _ in s],
                                [m for s in samples for _, m in s])


def random_samples(rng: random.Random, max_samples: int = 4, max_splits: int = 4) -> list[list[tuple[int, str]]]:
    return [[(rng.randint(1, 6), rng.choice(MODES)) for _ in range(rng.randint(1, max_splits))]
            for _ in range(rng.randint(1, max_samples))]


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention with GQA by repeat_interleave: (T, H, hd), (T, Hkv, hd) -> (T, H * hd)."""
    t, h, hd = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(~mask[None], float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out.reshape(t, h * hd)


def qkv(t: int, seed: int, h: int = 4, hkv: int = 2, hd: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, h, hd, generator=g), torch.randn(t, hkv, hd, generator=g),
            torch.randn(t, hkv, hd, generator=g))


# sample 0: causal(2) noise(2) full(1); sample 1: causal(2)
HAND = [[(2, "causal"), (2, "noise"), (1, "full")], [(2, "causal")]]
HAND_MASK = torch.tensor([
    [1, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0],
    [1, 1, 0, 0, 1, 0, 0],
    [0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 1, 1],
], dtype=torch.bool)


#####################################################################################################
# Dense mask vs the brute-force reference
#####################################################################################################


def test_reference_mask_matches_hand_written_matrix():
    assert torch.equal(reference_mask(HAND), HAND_MASK)


@pytest.mark.parametrize("samples", [
    HAND,
    [[(3, "causal")]],
    [[(4, "full")]],
    [[(3, "noise")]],
    [[(2, "full"), (3, "full"), (2, "causal"), (3, "causal")], [(2, "causal"), (4, "noise")]],
    [[(3, "causal"), (2, "noise"), (2, "noise"), (1, "causal")]],
    [[(1, "causal")], [(1, "full")], [(1, "noise")]],
], ids=["hand", "causal", "full", "noise", "det+t2i", "two-noise", "singletons"])
def test_dense_mask_hand_layouts(samples):
    assert torch.equal(AttentionMask(layout_of(samples)).dense(), reference_mask(samples))


def test_dense_mask_hand_matrix():
    assert torch.equal(AttentionMask(layout_of(HAND)).dense(), HAND_MASK)


def test_dense_mask_random_layouts():
    rng = random.Random(1234)
    for _ in range(100):
        samples = random_samples(rng)
        dense = AttentionMask(layout_of(samples)).dense()
        assert dense.dtype == torch.bool
        assert torch.equal(dense, reference_mask(samples)), samples


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURE)
@pytest.mark.parametrize("folder", FIXTURES, ids=[p.name for p in FIXTURES])
def test_dense_mask_matches_fixture_masks(folder):
    meta = json.loads((folder / "batch.json").read_text())
    tensors = load_file(folder / "batch.safetensors")
    flat_lens = [n for lens in meta["split_lens"] for n in lens]
    flat_modes = [m for modes in meta["attn_modes"] for m in modes]
    dense = AttentionMask(SequenceLayout.build(meta["sample_lens"], flat_lens, flat_modes)).dense()
    assert dense.shape == (meta["sequence_length"],) * 2
    samples = [list(zip(lens, modes, strict=True)) for lens, modes in zip(meta["split_lens"], meta["attn_modes"],
                                                                          strict=True)]
    assert torch.equal(dense, reference_mask(samples))
    bounds = [0]
    for n in meta["sample_lens"]:
        bounds.append(bounds[-1] + n)
    for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        additive = tensors[f"nested_attention_masks.{k}"]
        assert set(additive.unique().tolist()) <= {0.0, float("-inf")}
        assert torch.equal(dense[s:e, s:e], additive == 0), f"sample {k}"
        assert not dense[s:e, :s].any() and not dense[s:e, e:].any(), f"sample {k} sees another sample"


#####################################################################################################
# Arbitrary token order
#####################################################################################################


def test_permuted_order_dense_mask():
    rng = random.Random(99)
    for seed in range(40):
        samples = random_samples(rng)
        layout = layout_of(samples)
        order = torch.randperm(len(layout), generator=torch.Generator().manual_seed(seed))
        base = AttentionMask(layout).dense()
        assert torch.equal(AttentionMask(layout, order).dense(), base[order][:, order]), samples


#####################################################################################################
# Kernels
#####################################################################################################

KERNEL_LAYOUTS = [
    [[(4, "full"), (3, "full"), (5, "causal")], [(3, "causal"), (6, "noise")]],
    [[(2, "causal"), (3, "noise"), (2, "full"), (4, "causal")]],
    [[(7, "causal")], [(5, "full")], [(1, "causal"), (1, "noise"), (3, "causal")]],
]


@pytest.mark.parametrize("samples", KERNEL_LAYOUTS, ids=["det+t2i", "noise-mid", "three-samples"])
def test_kernels_agree_with_naive_attention(samples):
    layout = layout_of(samples)
    q, k, v = qkv(len(layout), seed=len(layout))
    mask = AttentionMask(layout)
    ref = naive_attention(q, k, v, reference_mask(samples))
    sdpa = attend(q, k, v, mask, backend="sdpa")
    flex = attend(q, k, v, AttentionMask(layout), backend="flex_eager")
    assert sdpa.shape == flex.shape == (len(layout), 4 * 8)
    torch.testing.assert_close(sdpa, flex, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex_eager"])
def test_kernels_permuted_order(backend):
    rng = random.Random(7)
    for seed in range(2):
        samples = random_samples(rng)
        layout = layout_of(samples)
        q, k, v = qkv(len(layout), seed=seed)
        order = torch.randperm(len(layout), generator=torch.Generator().manual_seed(100 + seed))
        base = attend(q, k, v, AttentionMask(layout), backend=backend)
        permuted = attend(q[order], k[order], v[order], AttentionMask(layout, order), backend=backend)
        torch.testing.assert_close(permuted, base[order], atol=1e-5, rtol=0)
        torch.testing.assert_close(base, naive_attention(q, k, v, reference_mask(samples)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex_eager"])
def test_only_allowed_keys_influence_a_query(backend):
    # tokens: sample 0 = causal 0..2, noise 3..5, full 6..7; sample 1 = causal 8..10
    samples = [[(3, "causal"), (3, "noise"), (2, "full")], [(3, "causal")]]
    layout = layout_of(samples)
    mask = AttentionMask(layout)
    q, k, v = qkv(len(layout), seed=5)
    base = attend(q, k, v, mask, backend=backend)
    # the queries that may see each perturbed key, from the rules of docs/method.md, "Packed sequences", written out
    # by hand
    visible_from = {
        1: {1, 2, 3, 4, 5, 6, 7},  # causal token 1: itself, later causal tokens, the noise and full splits
        4: {3, 4, 5},  # a noise token: only its own split
        7: {6, 7},  # a full token: its own split only (nothing comes after it in sample 0)
        9: {9, 10},  # sample 1, causal: itself and later tokens of its sample
    }
    for key, queries in visible_from.items():
        v2 = v.clone()
        v2[key] += 10.0
        changed = (attend(q, k, v2, mask, backend=backend) - base).abs().amax(dim=1)
        for query in range(len(layout)):
            if query in queries:
                assert changed[query] > 1e-3, f"query {query} should see key {key}"
            else:
                assert changed[query] <= 1e-6, f"query {query} must not see key {key}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for compiled flex attention")
def test_compiled_flex_matches_sdpa_on_cuda():
    samples = KERNEL_LAYOUTS[0]
    layout = layout_of(samples)
    layout = SequenceLayout(layout.sample.cuda(), layout.split.cuda(), layout.mode.cuda())
    q, k, v = (t.cuda() for t in qkv(len(layout), seed=0, hd=16))
    order = torch.randperm(len(layout), generator=torch.Generator().manual_seed(0)).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = naive_attention(q, k, v, reference_mask(samples).cuda())
        for o in (None, order):
            mask = AttentionMask(layout, o)
            flex = attend(*(t if o is None else t[o] for t in (q, k, v)), mask, backend="flex")
            sdpa = attend(*(t if o is None else t[o] for t in (q, k, v)), AttentionMask(layout, o), backend="sdpa")
            expect = ref if o is None else ref[o]
            torch.testing.assert_close(flex, expect, atol=1e-4, rtol=0)
            torch.testing.assert_close(sdpa, expect, atol=1e-4, rtol=0)


#####################################################################################################
# ViT documents
#####################################################################################################


def test_documents_block_diagonal():
    seqlens = torch.tensor([3, 1, 4])
    dense = AttentionMask(SequenceLayout.documents(seqlens)).dense()
    expected = torch.block_diag(torch.ones(3, 3), torch.ones(1, 1), torch.ones(4, 4)).bool()
    assert torch.equal(dense, expected)


def test_documents_attention_is_per_image():
    seqlens = torch.tensor([3, 1, 4])
    q, k, v = qkv(8, seed=3, h=2, hkv=2)
    out = attend(q, k, v, AttentionMask(SequenceLayout.documents(seqlens)), backend="sdpa")
    pieces, start = [], 0
    for n in seqlens.tolist():
        sl = slice(start, start + n)
        pieces.append(naive_attention(q[sl], k[sl], v[sl], torch.ones(n, n, dtype=torch.bool)))
        start += n
    torch.testing.assert_close(out, torch.cat(pieces), atol=1e-5, rtol=0)


#####################################################################################################
# Errors
#####################################################################################################


def test_split_lens_must_sum_to_sample_lens():
    with pytest.raises(ValueError, match="sum"):
        SequenceLayout.build([4, 3], [4, 2], ["causal", "full"])


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown attention mode"):
        SequenceLayout.build([4], [2, 2], ["causal", "bidirectional"])


def test_one_mode_per_split():
    with pytest.raises(ValueError):
        SequenceLayout.build([4], [2, 2], ["causal"])


def test_split_crossing_sample_boundary():
    with pytest.raises(ValueError, match="crosses"):
        SequenceLayout.build([3, 3], [2, 4], ["causal", "full"])


def test_unknown_backend():
    layout = layout_of([[(2, "causal")]])
    q, k, v = qkv(2, seed=0)
    with pytest.raises(ValueError, match="backend"):
        attend(q, k, v, AttentionMask(layout), backend="flash")
