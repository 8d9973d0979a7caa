"""PackedStream: sharding, packing budgets, overflow, skips and exact resume through StatefulDataLoader."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.stateful_dataloader import StatefulDataLoader

from data_modules.stream import PackedStream, plan_tokens
from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import SamplePlan, TextSplit

CFG = UniGenDetConfig.from_name("tiny")


@dataclass(frozen=True)
class Rec:
    id: str
    n: int  # text length -> n + 2 tokens


def text_planner(record, g, skips):
    if record.n < 0:
        skips.skip("bad_text", record.id)
        return None
    # the random part must come from g so re-planning after a resume is identical
    noise = int(torch.randint(0, 5, (1,), generator=g))
    return SamplePlan([TextSplit([noise] * record.n, loss=True)], sample_id=record.id)


def records(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Rec(f"r{i}", int(torch.randint(1, 20, (1,), generator=g))) for i in range(n)]


def make(recs, **kw):
    args = dict(token_budget=48, packs_per_epoch=6, seed=1)
    args.update(kw)
    return PackedStream(recs, text_planner, CFG, **args)


def ids_of(batches):
    return [sid for b in batches for sid in b.sample_ids]


def loader(ds, workers=0):
    return StatefulDataLoader(ds, batch_size=None, num_workers=workers)


def test_packs_respect_the_budget_and_keep_every_sample():
    recs = records()
    ds = make(recs, packs_per_epoch=200)
    batches = list(loader(ds))
    assert all(b.seq_len <= 48 for b in batches)
    seen = ids_of(batches)
    # the first pass over the records delivers every record exactly once, in the seeded order, nothing dropped
    first_epoch = ds.shard_order(0, 0, 1)
    assert seen[: len(recs)] == [recs[i].id for i in first_epoch]
    # overflow: packs are filled greedily, a sample that does not fit opens the next pack
    for a, b in zip(batches, batches[1:], strict=False):
        nxt = next(r for r in recs if r.id == b.sample_ids[0])
        assert a.seq_len + nxt.n + 2 > 48


def test_too_long_samples_and_planner_skips_are_counted():
    recs = [Rec("ok1", 5), Rec("huge", 100), Rec("bad", -1), Rec("ok2", 7)]
    ds = make(recs, packs_per_epoch=1, token_budget=16, shuffle=False)  # ok1 + ok2 fill it exactly
    (batch,) = list(loader(ds))
    assert batch.sample_ids == ["ok1", "ok2"]
    assert batch.stats["skipped"] == {"too_many_tokens": 1, "bad_text": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_by_two_workers_shard_without_overlap_or_gap(workers):
    recs = records(40)
    seen = []
    for rank in (0, 1):
        # each of the 2 workers needs ~10 records x ~12 tokens for its first record epoch: 8 packs of 48 is plenty
        ds = make(recs, rank=rank, world_size=2, packs_per_epoch=16)
        batches = list(loader(ds, workers))
        assert len(batches) == 16
        keys = [k for b in batches for k in b.stats["records"]]
        assert {e for e, _ in keys} >= {0, 1}  # every shard went past its first record epoch
        seen += [i for e, i in keys if e == 0]
    assert sorted(seen) == list(range(len(recs)))  # record epoch 0 over 2 ranks x N workers: no overlap, no gap


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_exactly_the_next_samples(workers):
    recs = records(50)
    ref_loader = loader(make(recs, packs_per_epoch=8), workers)
    reference = []
    for _ in range(3):  # three loader epochs, crossing record epochs
        reference += [b.sample_ids for b in ref_loader]

    first = loader(make(recs, packs_per_epoch=8), workers)
    got, state = [], None
    it = iter(first)
    for _ in range(5):
        got.append(next(it).sample_ids)
    state = first.state_dict()
    del it, first
    resumed = loader(make(recs, packs_per_epoch=8), workers)
    resumed.load_state_dict(state)
    got += [b.sample_ids for b in resumed]  # the rest of loader epoch 1
    got += [b.sample_ids for _ in range(2) for b in resumed]  # epochs 2 and 3
    assert got == reference


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_delivers_each_record_once(workers):
    recs = records(30) + [Rec("bad", -1)]
    ids = []
    for rank in (0, 1):
        ds = make(recs, rank=rank, world_size=2, one_pass=True)
        batches = list(loader(ds, workers))
        assert all(b.seq_len <= 48 for b in batches)
        ids += ids_of(batches)
    assert sorted(ids) == sorted(r.id for r in recs if r.n >= 0)


def test_each_loader_epoch_yields_its_length_even_when_not_drained():
    """Lightning stops asking after len(loader) batches; the next epoch must still get a full quota."""
    dl = loader(make(records(), packs_per_epoch=3))
    for _ in range(3):
        it = iter(dl)
        assert [next(it) is not None for _ in range(3)] == [True] * 3


def test_a_corpus_of_only_bad_records_is_an_error_not_a_hang():
    ds = make([Rec("bad1", -1), Rec("bad2", -1), Rec("huge", 100)], packs_per_epoch=1)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(loader(ds)))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_recorded_progress_carries_over_loader_epochs(workers):
    """Loader workers are new processes every loader epoch: with the main process recording each pack it trains
    on, three loader epochs deliver exactly the samples of one three-times-longer epoch (without it, every
    epoch of a worker would start again from the records' beginning)."""
    ds = make(records(), packs_per_epoch=4)
    dl = loader(ds, workers)
    seen = []
    for _ in range(3):
        for b in dl:
            ds.record(b)
            seen += b.sample_ids
    assert seen == ids_of(list(loader(make(records(), packs_per_epoch=12), workers)))
    # through a checkpoint: a fresh stream given the recorded progress delivers the fourth loader epoch
    fresh = make(records(), packs_per_epoch=4)
    fresh.set_progress(ds.progress())
    assert seen + ids_of(list(loader(fresh, workers))) == ids_of(
        list(loader(make(records(), packs_per_epoch=16), workers)))


def test_state_of_another_rank_is_refused():
    ds = make(records(), rank=0, world_size=2)
    state = ds.state_dict()
    other = make(records(), rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)


def train_layout(recs, carried, world, workers, packs):
    """Train ``packs`` packs on each of ``world`` ranks (``workers`` loader workers each), starting from the
    progress of every rank of the previous layout (``carried``; None: a fresh run); returns (trained record keys,
    each rank's progress). Packs the loader prefetched but nobody trained are not recorded, as in training."""
    keys, out = [], []
    for rank in range(world):
        ds = make(recs, rank=rank, world_size=world, num_workers=workers, packs_per_epoch=10_000)
        if carried is not None:
            ds.reshard(carried)
        it = iter(loader(ds, workers))
        for _ in range(packs):
            b = next(it)
            ds.record(b)
            keys += b.stats["records"]
        del it
        out.append(ds.progress())
    return keys, out


def passes_done(progress) -> int:
    """Record epochs every shard of the layout has finished."""
    return min(st["epoch"] for p in progress for st in p["workers"].values())


@pytest.mark.parametrize(("layouts", "workers"), [((2, 1), 0), ((1, 2), 0), ((2, 1), 2), ((1, 2), 2),
                                                  ((2, 3, 1), 0), ((1, 2), (0, 2))])
def test_a_pass_continues_on_another_layout_without_repeating_or_skipping(layouts, workers):
    """Ranks x workers change between checkpoints (2 -> 1, 1 -> 2, 2 -> 3 -> 1 processes; 0 or 2 loader workers,
    or more workers after the resume): the record epochs begun before the change are finished after it, every
    record trained exactly once per epoch, as in one uninterrupted pass."""
    recs = records(97) + [Rec("bad", -1)]
    workers = workers if isinstance(workers, tuple) else (workers,) * len(layouts)
    trained, progress = [], None
    for i, (world, w) in enumerate(zip(layouts, workers, strict=True)):
        last = i == len(layouts) - 1
        keys, progress = train_layout(recs, progress, world, w, 60 if last else 3)
        trained += keys
        if not last:
            assert passes_done(progress) == 0  # the change happens in the middle of the first pass
    assert passes_done(progress) >= 2
    per_epoch = Counter((e, recs[i].id) for e, i in trained if e < 2)
    uninterrupted = Counter((e, r.id) for e in range(2) for r in recs if r.n >= 0)
    assert per_epoch == uninterrupted


def test_a_carried_pass_goes_through_a_checkpoint_and_its_first_samples_are_the_remainder():
    recs = records(40)
    keys, old = train_layout(recs, None, 2, 0, 3)
    taken = {i for e, i in keys if e == 0}
    one = make(recs, world_size=1, packs_per_epoch=10_000)
    one.reshard(old)
    saved = torch.load(_roundtrip(one.progress()), weights_only=True)  # the carry is plain data
    again = make(recs, world_size=1, packs_per_epoch=10_000)
    again.set_progress(saved)
    first = next(iter(loader(again)))
    assert first.stats["records"][0][0] == 0 and not taken & {i for _, i in first.stats["records"]}


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_plan_tokens_matches_the_packer():
    plans = [text_planner(r, torch.Generator().manual_seed(0), None) for r in records(5)]
    from tests.conftest import mixed_plans
    from unigendet.model.packing import pack

    for plan in plans + mixed_plans(CFG) + mixed_plans(CFG, with_latents=True):
        assert plan_tokens(plan, CFG) == pack([plan], CFG).seq_len


@settings(max_examples=25, deadline=None)
@given(layouts=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 6)), min_size=1, max_size=4),
       seed=st.integers(0, 99))
def test_any_sequence_of_layouts_trains_each_record_once_per_pass(layouts, seed):
    """Property: whatever the sequence of world sizes and of packs trained between changes (possibly crossing
    record epochs, possibly 0 progress on some shard), each finished pass trains every record exactly once."""
    recs = records(41, seed=seed)
    trained, progress = [], None
    for world, packs in [*layouts, (2, 80)]:
        keys, progress = train_layout(recs, progress, world, 0, packs)
        trained += keys
    done = passes_done(progress)
    assert done >= 1
    per_epoch = Counter((e, recs[i].id) for e, i in trained if e < done)
    assert per_epoch == Counter((e, r.id) for e in range(done) for r in recs)


def test_a_pass_over_other_data_is_not_continued(caplog):
    """Progress saved over 60 records, resumed over 50 on another layout: the data changed, the pass starts again
    (logged) instead of reading bitmaps of the wrong size."""
    _, old = train_layout(records(60), None, 2, 0, 2)
    ds = make(records(50), world_size=1, packs_per_epoch=10_000)
    with caplog.at_level("WARNING", logger="unigendet.data"):
        ds.reshard(old)
    assert "the data changed" in caplog.text and ds.carry is None
    assert ids_of([next(iter(loader(ds)))])[0] == records(50)[ds.shard_order(0, 0, 1)[0]].id
