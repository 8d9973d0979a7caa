"""callbacks.StepLog with a real Trainer: one line per training step, also when a run stacks a second StepLog on
experiments/base.yaml's (the first one writes, the duplicate stays silent), in the run folder or default_root_dir."""

from __future__ import annotations

import lightning as L
import torch

from callbacks import StepLog, read_step_log


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def training_step(self, batch, batch_idx):
        loss = ((self.w - batch[0]) ** 2).mean()
        return {"loss": loss, "train/loss_mse": loss.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)), batch_size=2)
    L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks).fit(Tiny(), data)


def test_a_second_steplog_on_the_same_file_writes_nothing(tmp_path):
    _fit(tmp_path, [StepLog(), StepLog()])
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 5 and sorted(read_step_log(tmp_path / "steps.jsonl")) == [1, 2, 3, 4, 5]
    assert all("train/loss_mse" in line for line in lines)


def test_steplogs_on_different_files_both_write(tmp_path):
    other = tmp_path / "other.jsonl"
    _fit(tmp_path, [StepLog(), StepLog(path=str(other))])
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 5
    assert len(other.read_text().splitlines()) == 5
