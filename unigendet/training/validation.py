"""One validation or test pass of the training module: the EMA weights swapped in for its duration, the head's
p(fake) and CE on detection samples, the flow MSE under fixed noise on generation samples, and the loop metrics
(:func:`unigendet.evaluation.scores.loop_metrics`) at the end."""

from __future__ import annotations

import torch

from unigendet.evaluation.scores import loop_metrics
from unigendet.model.packing import PackedBatch


class ValidationPass:
    def __init__(self) -> None:
        self.collected: dict[str, list] = {}
        self._swap = None

    def start(self, model, ema) -> None:
        """A new pass: empty tallies, EMA weights in (when there is an EMA)."""
        self.collected = {"p_fake": [], "label": [], "ce": [], "mse": []}
        self._swap = ema.swap(model) if ema is not None else None
        if self._swap is not None:
            self._swap.__enter__()

    def leave_ema(self) -> None:
        """The training weights back (idempotent)."""
        if self._swap is not None:
            self._swap.__exit__(None, None, None)
            self._swap = None

    @torch.no_grad()
    def step(self, model, batch: PackedBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Tally one batch; returns its ``p_fake`` and ``label`` (empty without detection samples), in the order of
        ``det_labels``. Generation samples get the same noise every pass (seeded by ``batch_idx``)."""
        out = {"p_fake": torch.empty(0), "label": torch.empty(0, dtype=torch.long)}
        if batch.det_labels.numel():
            res = model(batch)
            out = {"p_fake": torch.softmax(res["det_logits"].float(), -1)[:, 0].cpu(), "label": batch.det_labels.cpu()}
            self.collected["p_fake"].append(out["p_fake"])
            self.collected["label"].append(out["label"])
            self.collected["ce"].append(res["ce"].detach().cpu())
        if batch.mse_indexes.numel():
            g = torch.Generator(device="cpu").manual_seed(batch_idx)
            noise = torch.randn(batch.n_vae_tokens, model.cfg.latent_token_dim, generator=g)
            self.collected["mse"].append(model(batch, noise=noise.to(batch.position_ids.device))["mse"].mean(-1).cpu())
        return out

    def metrics(self) -> dict[str, float]:
        return loop_metrics(self.collected)
