"""The benchmark scripts: the issue's fixed batch is what it claims, and the scripts run and print their JSON lines
(at test size; the numbers themselves are benchmarks, in BENCHMARKS.md, not tested)."""

from __future__ import annotations

import json
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_the_bagel_batch_is_the_issues_16120_token_batch():
    from train_step import issue_batches

    from unigendet.model.config import UniGenDetConfig
    from unigendet.model.packing import pack

    cfg = UniGenDetConfig.from_name("bagel-7b-mot", mot={"n_layers": 4}, head={"diga_layer": 4})
    plans = issue_batches(cfg, "bagel")
    batch = pack(plans["det"] + plans["gen"], cfg)
    assert batch.seq_len == 16_120
    # 5 x (1024 latent + 2, 1024 patches + 2, 30 + 2, 70 + 2) and 5 x (40 + 2, 1024 + 2)
    assert batch.sample_lens == [2156] * 5 + [1068] * 5
    assert batch.n_vae_tokens == 10 * 1024 and batch.mse_indexes.numel() == 5 * 1024
    assert batch.det_labels.tolist() == [0, 1, 0, 1, 0]
    assert batch.ce_indexes.numel() == 5 * 71  # the answer's 70 tokens and its <|im_end|>


def test_train_step_prints_one_json_line_per_configuration(capsys):
    from train_step import main

    main(["--preset", "tiny", "--modes", "fwd_bwd", "--ac", "both", "--warmup", "0", "--iters", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["activation_checkpointing"] for r in rows] == [False, True]
    for r in rows:
        assert r["tokens"] == 1000 and r["samples"] == 10 and r["tokens_per_s"] > 0
        assert r["model_tflops_per_step"] > 0
