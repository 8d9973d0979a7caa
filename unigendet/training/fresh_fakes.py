"""Fresh fakes (``docs/method.md``, "Co-evolution"): every J training steps the current generator draws a few images
for training captions; they join the next detection update as fakes, taught with the head and the verdict sentence
only (the generator's own images have no written forensic explanation).
"""

from __future__ import annotations

from unigendet.constants import DETECTION_PROMPT, FAKE_VERDICT
from unigendet.model.packing import PackedBatch, SamplePlan, TextSplit, VAESplit, ViTSplit, pack
from unigendet.training.data_contract import TrainingData

# two large primes: draw k's i-th caption is record (k * STEP_STRIDE + i * DRAW_STRIDE) mod n, which walks the whole
# training split over the run without repeating a caption within a draw and without a random stream of its own
STEP_STRIDE, DRAW_STRIDE = 7919, 104729


class FreshFakes:
    """The queue of generated images waiting for the next detection update."""

    def __init__(self) -> None:
        self._plans: list[SamplePlan] = []

    def draw(self, generate, data: TrainingData, k: int, *, n: int, px: int, steps: int) -> None:
        """Generate ``n`` images of ``px`` x ``px`` (``generate(prompts, height, width, steps, seed)``) for training
        captions chosen by ``k`` (also the seed; the module passes the training batches counted so far), and queue
        them as fakes with the detection side's question and transforms."""
        if data is None:
            raise TypeError("stage.fresh_fakes_every needs a data module that implements "
                            "unigendet.training.data_contract.TrainingData (the DataModules in data_modules/ do)")
        source = data.text_to_image
        if source is None:
            raise ValueError("stage.fresh_fakes_every needs text-to-image data to draw captions from")
        records = source.split_records("train")
        prompts = [records[(k * STEP_STRIDE + i * DRAW_STRIDE) % len(records)].prompt for i in range(n)]
        images = generate(prompts, height=px, width=px, steps=steps, seed=k)
        side = data.detection
        verdict = data.tok.encode(FAKE_VERDICT)
        question = data.tok.encode((side.prompt if side is not None else None) or DETECTION_PROMPT)
        with_vae = side.with_vae if side is not None else True
        vit_tf, vae_tf = data.vit_tf(), data.vae_tf()
        for img in images:
            splits = [VAESplit(image=vae_tf(img))] if with_vae else []
            self._plans.append(SamplePlan([*splits, ViTSplit(vit_tf(img)), TextSplit(question),
                                           TextSplit(verdict, loss=True)], label=0, sample_id="fresh_fake"))

    def batch(self, cfg, device) -> PackedBatch | None:
        """The queued fakes as one packed batch (the queue empties), or None when none are waiting."""
        if not self._plans:
            return None
        plans, self._plans = self._plans, []
        return pack(plans, cfg).to(device)
