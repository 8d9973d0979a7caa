"""Text tokenizer: a ``tokenizer.json`` (HF ``tokenizers``) plus the four special tokens the model needs.

* loads the file a BAGEL folder ships (Qwen2) or the one the demo corpus trains;
* ``encode`` never adds special tokens (the packer adds <|im_start|>/<|im_end|> and the vision markers itself);
* the special-token ids come from the tokenizer and must fit the model's vocabulary (``check_config``).
"""

from __future__ import annotations

from pathlib import Path

from unigendet.model.config import TokenConfig, UniGenDetConfig

SPECIAL_TOKENS = {"bos": "<|im_start|>", "eos": "<|im_end|>", "vision_start": "<|vision_start|>",
                  "vision_end": "<|vision_end|>"}


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer at {path}")
        self.path = path
        self._tok = HFTokenizer.from_file(str(path))
        ids = {}
        for key, text in SPECIAL_TOKENS.items():
            token_id = self._tok.token_to_id(text)
            if token_id is None:
                raise ValueError(f"{path} lacks the special token {text}; add it to the tokenizer first")
            ids[key] = token_id
        self.special = TokenConfig(**ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def check_config(self, cfg: UniGenDetConfig) -> None:
        """The model must use this tokenizer's special ids and have room for its whole vocabulary."""
        if cfg.tokens != self.special:
            raise ValueError(f"the model's special tokens {cfg.tokens} differ from the tokenizer's {self.special} "
                             f"({self.path})")
        if self.vocab_size > cfg.mot.vocab_size:
            raise ValueError(f"tokenizer {self.path} has {self.vocab_size} tokens, the model only "
                             f"{cfg.mot.vocab_size}")


def train_bpe(texts: list[str], path: str | Path, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer with exactly ``vocab_size - 4`` ordinary tokens followed by the four special
    tokens (ids ``vocab_size - 4 .. vocab_size - 1``, in SPECIAL_TOKENS order), and save it to ``path``.

    A small corpus runs out of merges: the vocabulary is then padded with reserved tokens that the pre-tokenizer never
    produces, so the special ids stay where the model config expects them.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    n_ordinary = vocab_size - len(SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_ordinary < len(alphabet):
        raise ValueError(f"a byte-level vocabulary needs at least {len(alphabet) + 4} tokens, got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_ordinary, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[], initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer=trainer)
    missing = n_ordinary - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_tokens([f"<|reserved_{k}|>" for k in range(missing)])
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS.values()]
    if ids != list(range(n_ordinary, vocab_size)):
        raise RuntimeError(f"special tokens landed at {ids}, expected {n_ordinary}..{vocab_size - 1}")
    tok.save(str(path))
    return Tokenizer(path)
