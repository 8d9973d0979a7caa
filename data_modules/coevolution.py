"""CoEvolutionDataModule: per training step, one packed detection batch AND one packed generation batch.

The two streams run side by side in the same loader workers (``ZipStream``), each with its own token budget, so
the LightningModule can make a detection update and a generation update in the same step. Their states are saved
and restored together. Validation yields the two held-out sets as two loaders (dataloader_idx 0 = detection,
1 = generation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch.utils.data import IterableDataset

from data_modules.detection import DetectionDataModule
from data_modules.stream import PackedStream
from unigendet.model.config import UniGenDetConfig


class ZipStream(IterableDataset):
    """Yields ``{name: batch}`` with one batch from each stream; all streams have the same length."""

    def __init__(self, streams: dict[str, PackedStream]) -> None:
        lengths = {len(s) for s in streams.values()}
        if len(lengths) != 1:
            raise ValueError(f"zipped streams need equal packs per epoch, got {lengths}")
        self.streams = streams

    def __len__(self) -> int:
        return len(next(iter(self.streams.values())))

    def __iter__(self) -> Iterator[dict]:
        iters = {name: iter(s) for name, s in self.streams.items()}
        for items in zip(*iters.values(), strict=False):  # each stream yields this worker's quota
            out = {}
            for name, item in zip(iters, items, strict=True):
                if isinstance(item, dict):  # e.g. the generation stream's {"gen", "teacher"}
                    out.update(item)
                else:
                    out[name] = item
            yield out
        for it in iters.values():  # let each stream finish its loader epoch (resets its quota)
            for _ in it:
                raise RuntimeError("a zipped stream yielded more packs than its length")

    def state_dict(self) -> dict:
        return {name: s.state_dict() for name, s in self.streams.items()}

    def record(self, batch: dict) -> None:
        """Per stream, the state its part of ``batch`` was produced with (see ``PackedStream.record``)."""
        for name, s in self.streams.items():
            s.record(batch[name])  # the generation stream's "teacher" packs share the state of its "gen" pack

    def progress(self) -> dict:
        return {name: s.progress() for name, s in self.streams.items()}

    def set_progress(self, progress: dict) -> None:
        for name, s in self.streams.items():
            s.set_progress(progress.get(name, {}))

    def load_state_dict(self, state: dict) -> None:
        for name, s in self.streams.items():
            s.load_state_dict(state[name])


@dataclass(eq=False, repr=False)
class CoEvolutionDataModule(DetectionDataModule):
    """The detection fields of :class:`DetectionDataModule`, plus ``gen`` for the generation stream."""

    gen: dict = field(default_factory=dict)
    """T2IDataModule arguments for the generation stream (train/val/test paths, token_budget, caption_dropout,
    teacher, ...); tokenizer, seed, num_workers and sizes are shared with the detection side unless given."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from data_modules.t2i import T2IDataModule

        shared = {"tokenizer": self.tokenizer, "seed": self.seed + 1, "num_workers": self.num_workers,
                  "vit_min_side": self.vit_min_side, "vit_max_side": self.vit_max_side,
                  "vae_min_side": self.vae_min_side, "vae_max_side": self.vae_max_side,
                  "replicate_across_ranks": self.replicate_across_ranks}
        self.gen_dm = T2IDataModule(**{**shared, **_typed(T2IDataModule, self.gen)})

    def connect(self, cfg: UniGenDetConfig):
        super().connect(cfg)
        self.gen_dm.connect(cfg)
        return self

    def setup(self, stage: str | None = None) -> None:
        self.gen_dm._trainer = getattr(self, "_trainer", None)

    def train_dataloader(self):
        det = self.stream("train", budget=self.token_budget, packs_per_epoch=self.packs_per_epoch)
        gen = self.gen_dm.stream("train", budget=self.gen_dm.token_budget, packs_per_epoch=len(det))
        return self.loader(self._track(ZipStream({"det": det, "gen": gen})))

    def val_dataloader(self):
        loaders = []
        if self.val is not None:
            loaders.append(super().val_dataloader())
        if self.gen_dm.val is not None:
            loaders.append(self.gen_dm.val_dataloader())
        return loaders


def _typed(cls, values: dict) -> dict:
    """Dotted command-line overrides of a dict field arrive as strings (``--data.gen.token_budget=400``): parse
    them as YAML scalars for the fields of ``cls`` that are not plain strings; unknown keys are an error."""
    import dataclasses
    import typing

    import yaml

    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown generation-stream options {sorted(unknown)}; known: {sorted(known)}")
    out = {}
    for key, value in values.items():
        if isinstance(value, str) and hints.get(key) not in (str, str | None):
            value = yaml.safe_load(value)
        out[key] = value
    return out
