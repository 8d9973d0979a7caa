"""CoEvolutionDataModule: per training step, one packed detection batch AND one packed generation batch.

The two streams run side by side in the same loader workers (``ZipStream``), each with its own token budget, so
the LightningModule can make a detection update and a generation update in the same step. Their states are saved
and restored together. Validation yields the two held-out sets as two loaders (dataloader_idx 0 = detection,
1 = generation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch.utils.data import IterableDataset

from data_modules.detection import DetectionDataModule
from data_modules.stream import PackedStream
from data_modules.t2i import T2IDataModule, T2IFields
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

    def reshard(self, ranks: list) -> None:
        for name, s in self.streams.items():
            s.reshard([(p or {}).get(name) for p in ranks])

    def load_state_dict(self, state: dict) -> None:
        for name, s in self.streams.items():
            s.load_state_dict(state[name])


@dataclass
class _GenSplits:
    train: str | None = None
    """Training split: metadata JSON/JSONL of {"image_path", "prompt"}, a Parquet file, or a folder of shards."""
    val: str | None = None
    """Held-out split (validation flow loss, image samples, FID during training)."""
    test: str | None = None
    """Test split (``unigendet test``: FID / KID / IS against its real images)."""
    token_budget: int = 4096
    """Tokens per packed generation batch."""
    max_sample_tokens: int | None = None
    """Samples longer than this are skipped and counted (default: the budget)."""


@dataclass
class GenStream(T2IFields, _GenSplits):
    """The generation stream of :class:`CoEvolutionDataModule` (``data.gen`` in a config): its splits and budget, the
    text-to-image fields of :class:`~data_modules.t2i.T2IDataModule`, and optional settings that otherwise follow the
    detection side. A typed dataclass, so stacked configs merge it key by key and command-line values keep their
    types (``--data.gen.token_budget=400`` is an int)."""

    tokenizer: str | None = None
    """Default: the detection side's tokenizer."""
    num_workers: int | None = None
    """Default: the detection side's."""
    vit_min_side: int | None = None
    """Image side bounds (default: the detection side's): ``vit_*`` for the DIGA teacher's view, ``vae_*`` for the
    generation targets."""
    vit_max_side: int | None = None
    vae_min_side: int | None = None
    vae_max_side: int | None = None


#: GenStream fields that follow the detection side when left unset
FOLLOW_DETECTION = ("tokenizer", "num_workers", "vit_min_side", "vit_max_side", "vae_min_side", "vae_max_side")


@dataclass(eq=False, repr=False)
class CoEvolutionDataModule(DetectionDataModule):
    """The detection fields of :class:`DetectionDataModule`, plus ``gen`` for the generation stream."""

    gen: GenStream = field(default_factory=GenStream)
    """The generation stream (:class:`GenStream`); a plain dict of its fields is accepted from Python."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.gen, dict):
            known = [f.name for f in dataclasses.fields(GenStream)]
            unknown = sorted(set(self.gen) - set(known))
            if unknown:
                raise ValueError(f"unknown generation-stream settings {unknown}; known: {known}")
            self.gen = GenStream(**self.gen)
        settings = dataclasses.asdict(self.gen)
        for name in FOLLOW_DETECTION:
            if settings[name] is None:
                settings[name] = getattr(self, name)
        self.gen_dm = T2IDataModule(**settings, seed=self.seed + 1, replicate_across_ranks=self.replicate_across_ranks)

    @property
    def text_to_image(self) -> T2IDataModule:
        return self.gen_dm

    def connect(self, cfg: UniGenDetConfig, tokenizer: str | None = None):
        super().connect(cfg, tokenizer)
        self.gen_dm.connect(cfg, str(self.tok.path))
        return self

    def setup(self, stage: str | None = None) -> None:
        self.gen_dm.trainer = self.trainer

    def train_dataloader(self):
        det = self.stream("train", budget=self.token_budget, packs_per_epoch=self.packs_per_epoch)
        gen = self.gen_dm.stream("train", budget=self.gen_dm.token_budget, packs_per_epoch=len(det))
        gen.num_workers = self.num_workers  # both are read by this module's loader
        return self.loader(self._track(ZipStream({"det": det, "gen": gen})))

    def val_dataloader(self):
        loaders = []
        if self.val is not None:
            loaders.append(super().val_dataloader())
        if self.gen_dm.val is not None:
            loaders.append(self.gen_dm.val_dataloader())
        return loaders
