"""The evaluation protocol run from a LightningModule's test loop (``unigendet test``): EMA weights, parameters
gathered, every rank evaluating its share; rank 0 writes the report and, with a W&B logger, a table of the rows."""

from __future__ import annotations

import logging

from unigendet.distributed.sharding import gathered
from unigendet.evaluation.protocol import report_dir, run_protocol
from unigendet.evaluation.report import flat_metrics, write_report
from unigendet.inference import Engine

log = logging.getLogger("unigendet.evaluation.protocol")


def evaluate_module(module) -> dict[str, float]:
    """:func:`unigendet.evaluation.protocol.run_protocol` on the data module's test split; returns the flat
    ``test/...`` metrics (the same values on every rank)."""
    trainer, model = module.trainer, module.model
    dm = trainer.datamodule
    out_dir = report_dir(module.eval_cfg, trainer)  # a broadcast: every rank asks
    was_training = model.training
    try:
        with gathered(model):  # ranks evaluate different images: no collectives inside forwards
            results = run_protocol(Engine(model, dm.tok), dm, module.eval_cfg, out_dir=out_dir,
                                   detect_images=lambda images: module.detect_images(images))
    finally:
        model.train(was_training)
    if trainer.is_global_zero:
        out = write_report(results, out_dir)
        log.info("evaluation report: %s", out / "report.md")
        rows = results["_rows"]
        for lg in module.loggers:
            if rows and hasattr(lg, "log_table"):
                columns = [k for k in rows[0] if k != "index"]
                lg.log_table(key="test/detections", columns=columns, data=[[r[k] for k in columns] for r in rows])
    return flat_metrics(results)
