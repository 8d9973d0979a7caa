"""Property-based tests (hypothesis) of the packed-sequence contract, token-budget packing and the record readers.

* ``pack`` (docs/method.md, "Packed sequences") on random mixes of text / ViT / clean and noisy VAE splits with the
  ``tiny`` preset:
  lengths add up, the index tensors partition the sequence, ce / mse / det indexes follow the documented rules,
  RoPE positions restart per sample, packing commutes with reordering the samples, and the dense attention mask
  never crosses a sample boundary.
* ``PackedStream`` (data_modules/stream.py): the budget holds, packs are greedy (the next sample did not fit), every
  usable record is delivered exactly once per record epoch (and in ``one_pass``), and the packs are determined by the
  seed.
* ``read_detection`` / ``read_t2i``: arbitrary JSON never raises and every element is accounted for exactly once,
  well-formed FakeClue records round-trip, and a JSON list cut at any byte yields a prefix plus one malformed skip.

Every test runs derandomized (a fixed seed per test) with no deadline, so CI sees the same examples every run.
"""

from __future__ import annotations

import json
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from data_modules.stream import PackedStream, plan_tokens
from unigendet.inputs import json_stream as json_stream_module
from unigendet.inputs import records as records_module
from unigendet.inputs import skips as skips_module
from unigendet.inputs.records import CorpusError, read_detection, read_t2i, strip_image_tag
from unigendet.inputs.skips import SkipCounter
from unigendet.model.attention import AttentionMask, SequenceLayout
from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import PackedBatch, SamplePlan, TextSplit, VAESplit, ViTSplit, pack

CFG = UniGenDetConfig.from_name("tiny")
TOK = CFG.tokens
VIT_P = CFG.vit.patch_size
VAE_PX = CFG.vae_pixels_per_token
LAT_P = CFG.flow.latent_patch_size
Z = CFG.vae.z_channels


def props(n: int) -> settings:
    """A reproducible profile: fixed examples (derandomize), no deadline (first calls pay torch warm-up)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


#####################################################################################################
# Strategies: sample plans
#####################################################################################################

token_ids = st.lists(st.integers(0, TOK.bos - 1), max_size=6)
timesteps = st.floats(-3.0, 3.0, allow_nan=False)


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def vae_split(draw, latent: bool, timed: bool) -> VAESplit:
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    noisy = draw(st.booleans())
    t = draw(timesteps) if noisy and (timed or draw(st.booleans())) else None
    if latent:
        return VAESplit(latent=_rand(seed, Z, h * LAT_P, w * LAT_P), noisy=noisy, timestep=t)
    return VAESplit(image=_rand(seed, 3, h * VAE_PX, w * VAE_PX).clamp(-1, 1), noisy=noisy, timestep=t)


@st.composite
def vit_split(draw) -> ViTSplit:
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return ViTSplit(_rand(draw(st.integers(0, 2**16)), 3, h * VIT_P, w * VIT_P))


@st.composite
def sample_plan(draw, latent: bool, timed: bool, sample_id: int) -> SamplePlan:
    kinds = draw(st.lists(st.sampled_from(["text", "loss_text", "vit", "vae"]), min_size=1, max_size=4))
    splits: list = []
    for kind in kinds:
        if kind == "vit":
            splits.append(draw(vit_split()))
        elif kind == "vae":
            splits.append(draw(vae_split(latent, timed)))
        else:
            splits.append(TextSplit(draw(token_ids), loss=kind == "loss_text"))
    label = draw(st.none() | st.sampled_from([0, 1]))
    if label is not None and not any(isinstance(s, TextSplit) and s.loss for s in splits):
        splits.append(TextSplit(draw(token_ids), loss=True))  # a detection sample needs its answer
    if draw(st.booleans()) and draw(st.booleans()):  # an unfinished answer (inference) closes the sample
        splits.append(TextSplit(draw(token_ids), open=True))
    return SamplePlan(splits, label=label, sample_id=sample_id)


@st.composite
def plan_lists(draw, timed: bool = False, min_size: int = 1, max_size: int = 4) -> list[SamplePlan]:
    latent = draw(st.booleans())  # a batch gives all VAE inputs as images or all as latents
    n = draw(st.integers(min_size, max_size))
    return [draw(sample_plan(latent, timed, i)) for i in range(n)]


#####################################################################################################
# Packing helpers
#####################################################################################################


def expected_split_len(split) -> int:
    if isinstance(split, TextSplit):
        return len(split.ids) + (1 if split.open else 2)
    if isinstance(split, ViTSplit):
        return (split.image.shape[-2] // VIT_P) * (split.image.shape[-1] // VIT_P) + 2
    if split.latent is not None:
        return (split.latent.shape[-2] // LAT_P) * (split.latent.shape[-1] // LAT_P) + 2
    return (split.image.shape[-2] // VAE_PX) * (split.image.shape[-1] // VAE_PX) + 2


def split_spans(plans: list[SamplePlan]) -> list[tuple[int, int, int, object]]:
    """(sample, start, end, split) of every split, in packed order."""
    spans, cursor = [], 0
    for i, plan in enumerate(plans):
        for split in plan.splits:
            n = expected_split_len(split)
            spans.append((i, cursor, cursor + n, split))
            cursor += n
    return spans


def sample_starts(batch: PackedBatch) -> list[int]:
    starts, c = [], 0
    for n in batch.sample_lens:
        starts.append(c)
        c += n
    return starts


def per_sample(batch: PackedBatch) -> list[dict]:
    """Everything the batch says about each sample, with positions made relative to the sample's start."""
    starts = sample_starts(batch)
    out = []
    split_i = 0
    for s, (start, n) in enumerate(zip(starts, batch.sample_lens, strict=True)):
        end = start + n
        lens, modes = [], []
        while sum(lens) < n:
            lens.append(batch.split_lens[split_i])
            modes.append(batch.split_modes[split_i])
            split_i += 1

        def rel(idx: torch.Tensor, *values: torch.Tensor, start: int = start, end: int = end) -> list:
            keep = (idx >= start) & (idx < end)
            return [(int(i) - start, *(v[keep][k].tolist() for v in values))
                    for k, i in enumerate(idx[keep])]

        vit_rows = (batch.vit_indexes >= start) & (batch.vit_indexes < end)
        out.append({
            "len": n, "split_lens": lens, "modes": modes,
            "positions": batch.position_ids[start:end].tolist(),
            "text": rel(batch.text_indexes, batch.text_ids),
            "vit": rel(batch.vit_indexes, batch.vit_position_ids),
            "vit_tokens": batch.vit_tokens[vit_rows],
            "vae": rel(batch.vae_indexes, batch.vae_position_ids, batch.vae_timesteps),
            "ce": rel(batch.ce_indexes, batch.ce_labels),
            "mse": rel(batch.mse_indexes),
            "det": rel(batch.det_indexes, batch.det_labels),
            "id": batch.sample_ids[s],
        })
    return out


#####################################################################################################
# Packing properties
#####################################################################################################


@props(120)
@given(plans=plan_lists())
def test_pack_lengths_and_index_partition(plans):
    batch = pack(plans, CFG, generator=torch.Generator().manual_seed(0))
    spans = split_spans(plans)
    T = batch.seq_len
    assert T == sum(batch.sample_lens) == sum(batch.split_lens) == batch.position_ids.numel()
    assert batch.split_lens == [e - s for _, s, e, _ in spans]
    assert batch.sample_lens == [sum(expected_split_len(x) for x in p.splits) for p in plans]
    assert batch.sample_lens == [plan_tokens(p, CFG) for p in plans]  # the stream's budget counts the same tokens
    # text (markers included), ViT and VAE positions partition 0..T-1
    every = torch.cat([batch.text_indexes, batch.vit_indexes, batch.vae_indexes])
    assert sorted(every.tolist()) == list(range(T))
    assert batch.text_ids.numel() == batch.text_indexes.numel()
    assert batch.vit_tokens.shape[0] == batch.vit_indexes.numel() == int(batch.vit_seqlens.sum())
    assert batch.vae_timesteps.numel() == batch.vae_indexes.numel() == batch.vae_position_ids.numel()
    # image splits are <|vision_start|> tokens <|vision_end|>; text splits <|im_start|> ids [<|im_end|>]
    text = dict(zip(batch.text_indexes.tolist(), batch.text_ids.tolist(), strict=True))
    for _, s, e, split in spans:
        if isinstance(split, TextSplit):
            assert [text[i] for i in range(s, e)] == [TOK.bos, *split.ids] + ([] if split.open else [TOK.eos])
        else:
            assert (text[s], text[e - 1]) == (TOK.vision_start, TOK.vision_end)
            assert all(i not in text for i in range(s + 1, e - 1))


@props(120)
@given(plans=plan_lists())
def test_pack_loss_and_detection_indexes(plans):
    batch = pack(plans, CFG, generator=torch.Generator().manual_seed(0))
    spans = split_spans(plans)
    text = dict(zip(batch.text_indexes.tolist(), batch.text_ids.tolist(), strict=True))
    split_of = {i: k for k, (_, s, e, _) in enumerate(spans) for i in range(s, e)}
    # ce: every loss text split's tokens but its last, each labelled with the next token of the same split
    ce = batch.ce_indexes.tolist()
    assert len(set(ce)) == len(ce) and batch.ce_labels.numel() == len(ce)
    for i, label in zip(ce, batch.ce_labels.tolist(), strict=True):
        assert i in text and i + 1 in text
        split = spans[split_of[i]][3]
        assert isinstance(split, TextSplit) and split.loss and split_of[i + 1] == split_of[i]
        assert label == text[i + 1]
    assert len(ce) == sum(len(x.ids) + 1 for *_, x in spans if isinstance(x, TextSplit) and x.loss)
    # mse: exactly the latent tokens of noisy VAE splits; they (and only they) carry a finite timestep
    noisy = {i for _, s, e, x in spans if isinstance(x, VAESplit) and x.noisy for i in range(s + 1, e - 1)}
    assert sorted(batch.mse_indexes.tolist()) == sorted(noisy)
    finite = {i for i, t in zip(batch.vae_indexes.tolist(), batch.vae_timesteps.tolist(), strict=True)
              if t != float("-inf")}
    assert finite == noisy
    for _, s, _, x in spans:  # a given timestep is kept as is
        if isinstance(x, VAESplit) and x.noisy and x.timestep is not None:
            k = batch.vae_indexes.tolist().index(s + 1)
            assert batch.vae_timesteps[k].item() == pytest.approx(x.timestep)
    # det (docs/method.md, "Packed sequences"): one per labelled sample, at the <|im_start|> of its first text split
    # with loss
    expected = []
    for i, plan in enumerate(plans):
        if plan.label is not None:
            first = next(s for j, s, _, x in spans if j == i and isinstance(x, TextSplit) and x.loss)
            expected.append((first, plan.label))
    assert list(zip(batch.det_indexes.tolist(), batch.det_labels.tolist(), strict=True)) == expected
    for i in batch.det_indexes.tolist():
        assert text[i] == TOK.bos and i in ce  # the position that predicts the first answer token


@props(120)
@given(plans=plan_lists())
def test_pack_positions_restart_per_sample(plans):
    batch = pack(plans, CFG, generator=torch.Generator().manual_seed(0))
    pos = batch.position_ids.tolist()
    for start, n in zip(sample_starts(batch), batch.sample_lens, strict=True):
        p = pos[start:start + n]
        assert p[0] == 0 and all(a <= b for a, b in zip(p, p[1:], strict=False))
    for _, s, e, x in split_spans(plans):
        p = pos[s:e]
        if isinstance(x, TextSplit):  # causal: one new position per token
            assert p == list(range(p[0], p[0] + len(p)))
        else:  # an image: one position for the whole split
            assert set(p) == {p[0]}
    # the next split's first position: text +n, full image +1, noisy image +0
    spans = split_spans(plans)
    for (j0, s0, e0, x), (j1, s1, _, _) in zip(spans, spans[1:], strict=False):
        if j0 != j1:
            assert pos[s1] == 0
            continue
        advance = (e0 - s0) if isinstance(x, TextSplit) else (0 if isinstance(x, VAESplit) and x.noisy else 1)
        assert pos[s1] == pos[s0] + advance


@props(60)
@given(plans=plan_lists(timed=True, min_size=2), data=st.data())
def test_pack_is_invariant_to_sample_order(plans, data):
    perm = data.draw(st.permutations(range(len(plans))))
    a = per_sample(pack(plans, CFG))
    b = per_sample(pack([plans[i] for i in perm], CFG))
    for k, i in enumerate(perm):
        x, y = a[i], b[k]
        assert torch.equal(x.pop("vit_tokens"), y.pop("vit_tokens"))
        assert x == y


@props(60)
@given(plans=plan_lists(max_size=3))
def test_dense_mask_never_crosses_samples(plans):
    batch = pack(plans, CFG, generator=torch.Generator().manual_seed(0))
    layout = SequenceLayout.build(batch.sample_lens, batch.split_lens, batch.split_modes)
    dense = AttentionMask(layout).dense()
    sample = layout.sample
    cross = sample[:, None] != sample[None, :]
    assert not (dense & cross).any()
    assert dense.diagonal().all()  # every token sees itself
    # a noise split is invisible to every other split; every other earlier split of the sample is visible
    split, mode = layout.split, layout.mode
    other = split[:, None] != split[None, :]
    assert not (dense & other & (mode[None, :] == 2)).any()
    earlier = (split[None, :] < split[:, None]) & ~cross & (mode[None, :] != 2)
    assert dense[earlier].all()
    assert layout.sample.tolist() == [i for i, n in enumerate(batch.sample_lens) for _ in range(n)]


#####################################################################################################
# Token-budget packing (data_modules/stream.py)
#####################################################################################################


quiet_skips = mock.patch.object(skips_module.log, "disabled", True)  # no warning per first skip of each reason


@dataclass(frozen=True)
class Rec:
    id: str
    n: int  # text length -> n + 2 tokens; negative = a record the planner skips


def text_planner(record, g, skips):
    if record.n < 0:
        skips.skip("bad_text", record.id)
        return None
    noise = int(torch.randint(0, 5, (1,), generator=g))  # random choices come from the record's generator
    return SamplePlan([TextSplit([noise] * record.n, loss=True)], sample_id=record.id)


record_lists = st.lists(st.integers(-1, 30), min_size=1, max_size=25).map(
    lambda ns: [Rec(f"r{i}", n) for i, n in enumerate(ns)])


def usable(recs, limit) -> list[int]:
    return [i for i, r in enumerate(recs) if r.n >= 0 and r.n + 2 <= limit]


@props(60)
@given(recs=record_lists, budget=st.integers(2, 64), cap=st.none() | st.integers(2, 80), seed=st.integers(0, 5))
def test_stream_budget_greedy_and_each_record_once_per_epoch(recs, budget, cap, seed):
    limit = min(cap or budget, budget)
    good = usable(recs, limit)
    assume(good)  # one usable record is enough, however the reshuffled epochs order the skips around it
    ds = PackedStream(recs, text_planner, CFG, token_budget=budget, max_sample_tokens=cap,
                      packs_per_epoch=2 * len(recs) + 2, seed=seed)
    with quiet_skips:
        packs = list(ds)
    assert len(packs) == 2 * len(recs) + 2
    # no pack exceeds the budget (a sample over it is skipped, never packed alone over budget)
    assert all(b.seq_len <= budget for b in packs)
    # greedy: the first sample of each pack did not fit into the previous one
    for p, q in zip(packs, packs[1:], strict=False):
        assert p.seq_len + q.sample_lens[0] > budget
    # every usable record once per record epoch, in the epoch's seeded order; every other record counted as a skip
    keys = [k for b in packs for k in b.stats["records"]]
    assert keys == sorted(keys, key=lambda k: k[0])  # epochs do not interleave
    last = keys[-1][0]
    assert last >= 2  # packs_per_epoch covers two whole record epochs
    for epoch in range(last):
        order = [i for i in ds.shard_order(epoch, 0, 1) if i in good]
        assert [i for e, i in keys if e == epoch] == order
    assert [sid for b in packs for sid in b.sample_ids] == [recs[i].id for _, i in keys]
    n_bad = sum(r.n < 0 for r in recs)
    n_long = sum(r.n >= 0 and r.n + 2 > limit for r in recs)
    counts = packs[-1].stats["skipped"]
    assert counts.get("bad_text", 0) >= last * n_bad and counts.get("too_many_tokens", 0) >= last * n_long


def test_stream_with_a_usable_record_never_reports_an_all_skipped_shard():
    # r1 (2 tokens) fits the budget of 2, r0 and r2 (3 tokens) do not; seed 0 orders epochs [2,0,1], [1,2,0], [0,2,1]:
    # after r1 opens epoch 1, the skips r2, r0 (epoch 1) and r0, r2 (epoch 2) make 4 > 3 consecutive failures
    recs = [Rec("r0", 1), Rec("r1", 0), Rec("r2", 1)]
    ds = PackedStream(recs, text_planner, CFG, token_budget=2, packs_per_epoch=8, seed=0)
    with quiet_skips:
        packs = list(ds)
    assert [sid for b in packs for sid in b.sample_ids] == ["r1"] * 8


@props(40)
@given(recs=record_lists, budget=st.integers(2, 64), seed=st.integers(0, 5))
def test_stream_is_determined_by_the_seed(recs, budget, seed):
    assume(2 * len(usable(recs, budget)) >= len(recs))

    def run():
        ds = PackedStream(recs, text_planner, CFG, token_budget=budget, packs_per_epoch=len(recs) + 1, seed=seed)
        with quiet_skips:
            return [(b.stats["records"], b.text_ids.tolist(), b.sample_lens) for b in ds]

    assert run() == run()


@props(60)
@given(recs=record_lists, budget=st.integers(2, 64), world=st.integers(1, 3))
def test_one_pass_delivers_each_usable_record_once_across_ranks(recs, budget, world):
    good = usable(recs, budget)
    delivered, skipped = [], SkipCounter()
    for rank in range(world):
        ds = PackedStream(recs, text_planner, CFG, token_budget=budget, packs_per_epoch=1, one_pass=True,
                          rank=rank, world_size=world)
        with quiet_skips:
            packs = list(ds)
        assert all(b.seq_len <= budget for b in packs)
        for p, q in zip(packs, packs[1:], strict=False):
            assert p.seq_len + q.sample_lens[0] > budget
        order = [i for i in ds.shard_order(0, rank, world) if i in good]
        assert [i for b in packs for _, i in b.stats["records"]] == order  # file order, nothing lost
        delivered += order
        skipped.merge(ds.skips)
    assert sorted(delivered) == good
    assert len(delivered) + skipped.total == len(recs)


#####################################################################################################
# Strategies: JSON values and FakeClue records
#####################################################################################################

# any text, lone surrogates included (they reach the reader as "\udXXX" escapes or invalid UTF-8 bytes)
any_text = st.text(st.characters(blacklist_categories=()), max_size=12)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)

clean_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
stripped = clean_text.map(str.strip).filter(lambda s: s and "<image>" not in s)
safe_path = st.lists(st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=6),
                     min_size=1, max_size=3).map(lambda parts: "/".join(parts) + ".png")
roles_h = st.sampled_from(["human", "user", "Human", "USER"])
roles_g = st.sampled_from(["gpt", "assistant", "GPT", "Assistant"])


@st.composite
def fakeclue(draw) -> tuple[dict, dict]:
    """(a well-formed FakeClue record, the fields the reader must give back)."""
    prompt, answer = draw(stripped), draw(clean_text.filter(lambda s: s.strip()))
    tag = draw(st.sampled_from(["", "<image>\n{}", "{}\n<image>", "<image>{}", "{}<image>"]))
    human = tag.format(prompt) if tag else prompt
    conv = [{"from": draw(roles_h), "value": human}]
    conv += [{"from": draw(roles_h), "value": draw(clean_text)} for _ in range(draw(st.integers(0, 1)))]
    conv.append({"from": draw(roles_g), "value": answer})
    conv += [{"from": draw(roles_h | roles_g), "value": draw(clean_text)} for _ in range(draw(st.integers(0, 1)))]
    rec = {"image": draw(safe_path), "label": draw(st.sampled_from([0, 1])), "conversations": conv}
    cate = draw(st.none() | clean_text | st.just(...))
    if cate is not ...:
        rec["cate"] = cate
    expected = {"prompt": prompt, "answer": answer.strip(), "label": rec["label"], "image": rec["image"],
                "cate": cate if isinstance(cate, str) else None}
    return rec, expected


@st.composite
def near_records(draw) -> dict:
    """Objects with FakeClue's keys, each value either valid or arbitrary JSON: reach every check of the reader."""
    good, _ = draw(fakeclue())
    return {k: (draw(json_values) if draw(st.integers(0, 3)) == 0 else v) for k, v in good.items()
            if draw(st.integers(0, 7))}


elements = st.lists(json_values | near_records() | fakeclue().map(lambda t: t[0]), max_size=8)


def write_dump(value, ensure_ascii: bool) -> str:
    try:
        text = json.dumps(value, ensure_ascii=ensure_ascii)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # lone surrogates can only be written escaped
        return json.dumps(value, ensure_ascii=True)


_TMP = tempfile.TemporaryDirectory(prefix="unigendet_props_")  # removed at exit; each example overwrites its file


def write(text: str | bytes) -> Path:
    path = Path(_TMP.name) / "train.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def read_all(reader, path: Path, **kw):
    skips = SkipCounter()
    return list(reader(path, skips, **kw)), skips



#####################################################################################################
# Record readers
#####################################################################################################


@props(150)
@given(values=elements, lines=st.booleans(), ensure_ascii=st.booleans(), chunk=st.sampled_from([3, 16, 1 << 20]))
def test_detection_accounts_for_every_element_once(values, lines, ensure_ascii, chunk):
    if lines:
        assume(values and isinstance(values[0], dict))  # the first byte tells JSON Lines from a JSON list
        text = "".join(write_dump(v, ensure_ascii) + "\n" for v in values)
    else:
        text = write_dump(values, ensure_ascii)
    path = write(text)
    with quiet_skips, mock.patch.object(json_stream_module, "_CHUNK_CHARS", chunk):
        out, skips = read_all(read_detection, path)
    assert len(out) + skips.total == len(values)
    assert len({r.id for r in out}) == len(out)
    for r in out:
        assert type(r.label) is int and r.label in (0, 1) and r.prompt and r.answer and "<image>" not in r.prompt
        index = int(r.id.rsplit(":", 1)[1])
        assert values[index]["image"] == r.image


@props(100)
@given(recs=st.lists(fakeclue(), max_size=6), lines=st.booleans(), ensure_ascii=st.booleans())
def test_wellformed_fakeclue_records_round_trip(recs, lines, ensure_ascii):
    values = [r for r, _ in recs]
    if lines:
        assume(values)
        text = "".join(write_dump(v, ensure_ascii) + "\n\n" for v in values)  # blank lines are not elements
    else:
        text = write_dump(values, ensure_ascii)
    with quiet_skips:
        out, skips = read_all(read_detection, write(text))
    assert skips.total == 0
    got = [{"prompt": r.prompt, "answer": r.answer, "label": r.label, "image": r.image, "cate": r.cate} for r in out]
    assert got == [e for _, e in recs]
    assert [r.id for r in out] == [f"train.json:{i}" for i in range(len(values))]
    for v, r in zip(values, out, strict=True):
        assert strip_image_tag(v["conversations"][0]["value"]) == r.prompt


@props(150)
@given(recs=st.lists(fakeclue(), min_size=1, max_size=5), indent=st.sampled_from([None, 1]), data=st.data(),
       chunk=st.sampled_from([5, 64, 1 << 20]))
def test_json_list_cut_at_any_byte_yields_a_prefix_and_one_skip(recs, indent, data, chunk):
    values = [r for r, _ in recs]
    items = [json.dumps(v, ensure_ascii=False, indent=indent).encode("utf-8") for v in values]
    sep = b",\n" if indent else b", "
    full = b"[" + sep.join(items) + b"]"
    ends, c = [], 1  # byte offset just past each element
    for item in items:
        c += len(item)
        ends.append(c)
        c += len(sep)
    assert json.loads(full) == values
    cut = data.draw(st.integers(0, len(full)), label="cut")
    path = write(full[:cut])
    with quiet_skips, mock.patch.object(json_stream_module, "_CHUNK_CHARS", chunk):
        if cut == 0:
            with pytest.raises(CorpusError):
                read_all(read_detection, path)
            return
        out, skips = read_all(read_detection, path)
    complete = sum(e <= cut for e in ends)
    assert [r.id for r in out] == [f"train.json:{i}" for i in range(complete)]
    assert [r.answer for r in out] == [e["answer"] for _, e in recs[:complete]]
    assert dict(skips.counts) == ({} if cut == len(full) else {"malformed_record": 1})


def test_trailing_data_after_a_json_list_is_counted():
    # a fixed case (no shrinking): one good record in a list, then a second list of two good records
    good = {"image": "a.png", "label": 0, "conversations": [{"from": "human", "value": "<image>\nReal?"},
                                                            {"from": "gpt", "value": "This is a fake image."}]}
    text = json.dumps([good]) + "\n" + json.dumps([good, good]) + "\n"
    with quiet_skips:
        out, skips = read_all(read_detection, write(text))
    assert len(out) == 1
    assert skips.counts["malformed_record"] == 1  # the rest of the file is damage, as for a cut-off list


# T2I captions: valid text, blank, long, lone surrogates (escaped), non-strings, or raw bytes (maybe invalid UTF-8)
raw_caption = st.binary(min_size=1, max_size=8).map(lambda b: bytes(x | 0x80 if x < 0x20 or x in b'"\\' else x
                                                                       for x in b))
captions = (st.tuples(st.just("value"), any_text | st.just("   ") | st.just("x" * 5000) | st.integers() | st.none())
            | st.tuples(st.just("raw"), raw_caption))


def caption_ok(kind: str, caption, limit: int) -> tuple[bool, str | None]:
    """The documented rule: a non-blank string, valid UTF-8 (no lone surrogates), at most ``limit`` characters."""
    if kind == "raw":
        caption = caption.decode("utf-8", errors="surrogateescape")
    if not isinstance(caption, str) or not caption.strip() or len(caption) > limit:
        return False, None
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return False, None
    return True, caption


@props(120)
@given(rows=st.lists(st.tuples(captions, safe_path), min_size=1, max_size=8), lines=st.booleans(),
       limit=st.sampled_from([4, 50, records_module.MAX_CAPTION_CHARS]), ensure_ascii=st.booleans())
def test_t2i_metadata_captions(rows, lines, limit, ensure_ascii):
    encoded = []
    for (kind, caption), image in rows:
        if kind == "raw":
            marker = "@@CAPTION@@"
            line = json.dumps({"image_path": image, "prompt": marker}).encode()
            encoded.append(line.replace(marker.encode(), caption))
        else:
            encoded.append(write_dump({"image_path": image, "prompt": caption}, ensure_ascii).encode("utf-8"))
    data = b"".join(e + b"\n" for e in encoded) if lines else b"[" + b",\n".join(encoded) + b"]"
    with quiet_skips:
        out, skips = read_all(read_t2i, write(data), max_caption_chars=limit)
    assert len(out) + skips.total == len(rows)
    expected = []
    for i, ((kind, caption), image) in enumerate(rows):
        ok, text = caption_ok(kind, caption, limit)
        if ok:
            expected.append((f"train.json:{i}", text, image))
    assert [(r.id, r.prompt, r.image) for r in out] == expected
    assert set(skips.counts) <= {"bad_text", "text_too_long"}
