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
