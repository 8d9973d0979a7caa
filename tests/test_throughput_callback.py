"""Throughput callback: parameter counts read from the real module, the mask's attention pairs, the analytic FLOPs
of a hand-built batch, and a real Trainer run whose logged rates are read back from metrics.csv."""

from __future__ import annotations

import csv
import warnings

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from callbacks import Throughput
from callbacks.throughput import ParamCounts, attention_pairs, batch_flops, processed_passes
from tests.test_lit_module import corpus, make, trainer  # noqa: F401  (corpus is a fixture)
from unigendet.model.attention import AttentionMask, SequenceLayout
from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import SamplePlan, TextSplit, pack
from unigendet.model.unigendet import UniGenDet


@pytest.fixture(scope="module", params=["tiny", "demo"])
def built(request):
    cfg = UniGenDetConfig.from_name(request.param)
    return cfg, UniGenDet(cfg)


def test_param_counts_match_the_module(built):
    cfg, model = built
    m = cfg.mot
    d, hd = m.dim, m.head_dim
    # one expert by hand: q/k/v with bias, o without, q/k RMSNorm, two layer RMSNorms, SwiGLU without bias
    attn = d * m.n_heads * hd + m.n_heads * hd + 2 * (d * m.n_kv_heads * hd + m.n_kv_heads * hd) + m.n_heads * hd * d
    expert = attn + 2 * hd + 2 * d + 3 * d * m.mlp_dim
    counts = ParamCounts.from_model(model)
    assert counts.expert == expert
    assert counts.lm_head == m.vocab_size * d
    v = cfg.vit
    assert counts.vit_block == 4 * (v.dim * v.dim + v.dim) + 2 * v.dim * v.mlp_dim + v.mlp_dim + v.dim + 4 * v.dim
    # active per token = one of the two equal experts in every layer: half of every layer's parameters
    decoder_layers = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.layers."))
    und = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.layers.") and ".und." in n)
    assert counts.active_per_token(cfg) == und == decoder_layers // 2


def test_attention_pairs_equal_the_dense_mask():
    sample_lens, split_lens = [3, 9], [3, 1, 4, 2, 2]
    modes = ["causal", "causal", "full", "noise", "causal"]
    # hand: 3*4/2 | 1 + (4*1 + 16) + (2*5 + 4) + (2*5 + 3): the causal split after the noise one does not see it
    assert attention_pairs(sample_lens, split_lens, modes) == 6 + 1 + 20 + 14 + 13
    mask = AttentionMask(SequenceLayout.build(sample_lens, split_lens, modes)).dense()
    assert int(mask.sum()) == 54
    with pytest.raises(ValueError):
        attention_pairs([3], [2, 2], ["causal", "causal"])


def test_flops_of_a_text_batch_by_hand(built):
    cfg, model = built
    batch = pack([SamplePlan([TextSplit([1, 2, 3], loss=True)]), SamplePlan([TextSplit([4, 5], loss=True)])], cfg)
    assert batch.seq_len == 9 and batch.ce_indexes.numel() == 7  # <im_start> ids <im_end>; predicts ids + <im_end>
    counts = ParamCounts.from_model(model)
    m, pairs = cfg.mot, 5 * 6 // 2 + 4 * 5 // 2
    expected = 6 * (9 * m.n_layers * counts.expert + 7 * m.vocab_size * m.dim) + 12 * m.n_layers * m.dim * pairs
    assert batch_flops(batch, cfg, counts) == expected
    # forward only through one layer, no heads
    assert batch_flops(batch, cfg, counts, train=False, n_layers=1) == 2 * 9 * counts.expert + 4 * m.dim * pairs


def test_passes_follow_the_stage(corpus, tmp_path):  # noqa: F811
    """The training step reports the passes it ran; Throughput counts those."""
    lit, dm = make(corpus, teacher=True, stage={"diga": True, "gen_every": 2, "diga_layer": 1})
    reported = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            reported.append((outputs["step"], outputs["passes"], processed_passes(batch, outputs), batch))

    trainer(tmp_path, 2, callbacks=[Record()]).fit(lit, datamodule=dm)
    (s0, p0, counted0, b0), (s1, p1, counted1, b1) = reported
    # step 0: both updates, the teacher forward-only through diga_layer; step 1: detection only
    assert (s0, p0) == (0, [("det", True, None), ("gen", True, None), ("teacher", False, 1)])
    assert (s1, p1) == (1, [("det", True, None)])
    assert counted0 == [(b0["det"], True, None), (b0["gen"], True, None), (b0["teacher"], False, 1)]
    assert counted1 == [(b1["det"], True, None)]
    cfg = lit.cfg
    det, gen, teacher = (pack([SamplePlan([TextSplit(list(range(n)), loss=True)])], cfg) for n in (3, 4, 5))
    assert processed_passes(det) == [(det, True, None)]  # a single PackedBatch is trained
    # a step that reports nothing: every batch, the teacher forward-only
    assert processed_passes({"det": det, "teacher": teacher}) == [(det, True, None), (teacher, False, None)]


def test_trainer_run_logs_measured_rates(corpus, tmp_path):  # noqa: F811
    seen: list[int] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sum(b.seq_len for b in batch.values()))

    peak = 1e12
    lit, dm = make(corpus)
    cb = Throughput(peak_flops=peak, log_every_n_steps=1)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer(tmp_path, 3, logger=logger, callbacks=[Record(), cb]).fit(lit, datamodule=dm)

    records = list(cb.history)
    assert [r.step for r in records] == [0, 1, 2]
    assert [r.tokens for r in records] == seen  # det + gen packed tokens of each step (no teacher here)
    assert all(r.time_s > 0 and r.flops > 0 and r.samples > 0 for r in records)
    counts = ParamCounts.from_model(lit.model)
    assert records[0].flops >= 6 * seen[0] * counts.active_per_token(lit.cfg)

    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/tokens_per_s")]
    assert len(rows) == 3
    for k, row in enumerate(rows):
        done = records[: k + 1]
        seconds = sum(r.time_s for r in done)
        logged = {key: float(v) for key, v in row.items() if key.startswith("perf/")}
        assert logged["perf/tokens_per_s"] == pytest.approx(sum(r.tokens for r in done) / seconds, rel=1e-6)
        assert logged["perf/samples_per_s"] == pytest.approx(sum(r.samples for r in done) / seconds, rel=1e-6)
        assert logged["perf/step_time_s"] == pytest.approx(seconds / len(done), rel=1e-6)
        achieved = sum(r.flops for r in done) / seconds
        assert logged["perf/model_tflops_per_s"] == pytest.approx(achieved / 1e12, rel=1e-6)
        assert logged["perf/mfu"] == pytest.approx(logged["perf/model_tflops_per_s"] * 1e12 / peak, rel=1e-6)
        assert all(v > 0 for v in logged.values())


def test_no_logger_is_a_noop_with_one_notice(corpus, tmp_path):  # noqa: F811
    lit, dm = make(corpus)
    cb = Throughput(peak_flops=1e12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, 1, callbacks=[cb]).fit(lit, datamodule=dm)
    notices = [w for w in caught if "Throughput" in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in notices]
    assert not cb.history and cb.n_steps == 0 and cb.counts is None
