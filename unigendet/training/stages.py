"""What a training stage runs and how its losses are weighed: the two configs of :class:`LitUniGenDet`.

Every variant of the method is a :class:`Stage` of the one module (``docs/method.md``): co-evolution (the default:
a detection update, then a generation update, every step), GDUF as the authors ran it (``joint``), the DIGA stage
(``train_det=False, diga=True``), update ratios, teacher refreshes and fresh fakes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossWeights:
    ce: float = 1.0
    """Answer cross-entropy (detection update)."""
    det: float = 0.2
    """Real/fake head cross-entropy (detection update); the released code's 0.2."""
    mse: float = 1.0
    """Flow-matching MSE (generation update)."""
    diga: float = 0.5
    """DIGA cosine loss (generation update)."""


@dataclass
class Stage:
    joint: bool = False
    """GDUF as released: one update of all parameters on the weighted sum of all losses (``optim.clip_det`` clips
    the global norm)."""
    train_det: bool = True
    """Run detection updates (False: the detector side is frozen, e.g. the DIGA stage)."""
    train_gen: bool = True
    """Run generation updates."""
    det_every: int = 1
    """A detection update every N steps (ratios N det : M gen; one of the two must be 1)."""
    gen_every: int = 1
    """A generation update every M steps."""
    diga: bool = False
    """Add the DIGA loss to the generation update (needs teacher batches from the data module)."""
    diga_layer: int | None = None
    """Layer whose output DIGA aligns (default: the model config's ``head.diga_layer``)."""
    teacher: str = "frozen"
    """DIGA teacher: "frozen" (snapshot at the start) or "snapshot" (refreshed every ``teacher_refresh`` steps)."""
    teacher_refresh: int = 0
    teacher_from_ema: bool = False
    """Take the teacher snapshot from the EMA weights."""
    fresh_fakes_every: int = 0
    """Every J steps generate ``fresh_fakes`` images with the current generator and feed them as fakes (0: off)."""
    fresh_fakes: int = 2
    fresh_fake_px: int = 64
    fresh_fake_steps: int = 10
    on_nan: str = "raise"
    """Non-finite loss: "raise" (an error naming step and term) or "skip" (skip the update, counted)."""

    def __post_init__(self) -> None:
        if min(self.det_every, self.gen_every) != 1 or max(self.det_every, self.gen_every) < 1:
            raise ValueError("update ratios: one of det_every / gen_every must be 1, the other >= 1")
        if self.teacher not in ("frozen", "snapshot"):
            raise ValueError(f"teacher must be 'frozen' or 'snapshot', got {self.teacher!r}")
        if self.on_nan not in ("raise", "skip"):
            raise ValueError(f"on_nan must be 'raise' or 'skip', got {self.on_nan!r}")
        if self.teacher == "snapshot" and self.teacher_refresh < 1:
            raise ValueError("teacher='snapshot' needs teacher_refresh >= 1")
