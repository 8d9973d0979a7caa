"""Counted, logged skips: bad input never crashes a run and is never dropped silently.

Every reader and transform reports a bad record with ``skips.skip(reason, example_id)``. The counter keeps a count per
reason and the first example id, logs the first occurrence of each reason once (with the example and detail), and
can be merged across loader workers and ranks, saved in the loader state and logged as metrics
(``data/skipped/<reason>``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("unigendet.data")

# reasons used across the project (free-form reasons are allowed; these are the documented ones)
REASONS = {
    "missing_file": "the image file does not exist",
    "path_escapes_root": "the image path leaves the data root (.., absolute, symlink out)",
    "unreadable_image": "not an image, or the decoder failed",
    "truncated_image": "the image file ends early",
    "image_too_large": "more pixels than the decompression-bomb limit",
    "image_too_small": "a side shorter than the transform's minimum",
    "bad_label": "label is not 0 (fake) or 1 (real)",
    "empty_conversation": "no human turn or no gpt answer",
    "bad_conversation": "turns out of order or malformed",
    "bad_text": "text missing, not a string, or undecodable",
    "text_too_long": "caption/answer longer than the configured limit",
    "malformed_record": "a JSON line or record that cannot be parsed",
    "too_many_tokens": "the packed sample exceeds the per-sample token limit",
}


@dataclass
class SkipCounter:
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, example: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if reason not in self.examples:
            self.examples[reason] = str(example)
            log.warning("skipping record %s: %s%s (further '%s' skips are counted, not logged)", example, reason,
                        f" ({detail})" if detail else "", reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipCounter, log_new: bool = False) -> SkipCounter:
        """Add ``other``'s counts; with ``log_new``, log each reason this counter had not seen yet (once)."""
        if log_new:
            for reason in other.counts:
                if reason not in self.counts:
                    log.warning("skipping record %s: %s (further '%s' skips are counted, not logged)",
                                other.examples.get(reason, "?"), reason, reason)
        self.counts.update(other.counts)
        for reason, ex in other.examples.items():
            self.examples.setdefault(reason, ex)
        return self

    def metrics(self, prefix: str = "data/skipped") -> dict[str, int]:
        return {f"{prefix}/{reason}": n for reason, n in sorted(self.counts.items())}

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": dict(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state.get("counts", {}))
        self.examples = dict(state.get("examples", {}))
