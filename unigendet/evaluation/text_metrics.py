"""Scores of a written verdict against FakeClue's reference answer (the FakeVLM / UniGenDet protocol, docs/method.md,
"Evaluation protocol").

Features:
* :func:`parse_label` - the verdict a text states: the first standalone word "fake" or "real" (case-insensitive), as
  FakeClue answers open ("This is a fake image. ..."); None when the text names neither (counted as unparsed, and
  scored as wrong by the evaluation).
* :func:`rouge_l` - ROUGE-L F-measure with Porter stemming (torchmetrics; the stemmer is nltk's, which needs no data
  download), per pair, so a corpus score is the mean of the pairs' scores.
* :func:`css` - the cosine similarity score: TF-IDF vectors of the reference and the generated explanation, fitted on
  that pair alone, with the defaults of scikit-learn's ``TfidfVectorizer`` that the authors' script uses (lowercase,
  tokens of 2+ word characters, raw counts, smoothed idf ``ln((1 + n) / (1 + df)) + 1``, L2 norm). Written here in a
  few lines instead of adding scikit-learn; the tests check it against values scikit-learn computed.
"""

from __future__ import annotations

import math
import re
from collections import Counter

LABEL_WORD = re.compile(r"\b(fake|real)\b", re.IGNORECASE)
TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern


def parse_label(text: str | None) -> int | None:
    """0 = fake, 1 = real (the dataset's labels), from the first "fake"/"real" word; None if there is none."""
    m = LABEL_WORD.search(text or "")
    if m is None:
        return None
    return 0 if m.group(1).lower() == "fake" else 1


def css(reference: str, prediction: str) -> float:
    """TF-IDF cosine similarity of two texts (0 when either has no token)."""
    docs = [Counter(TOKEN.findall(t.lower())) for t in (reference, prediction)]
    if not all(docs):
        return 0.0
    df = Counter(w for d in docs for w in d)
    idf = {w: math.log((1 + len(docs)) / (1 + n)) + 1.0 for w, n in df.items()}
    vecs = [{w: c * idf[w] for w, c in d.items()} for d in docs]
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
    dot = sum(v * vecs[1].get(w, 0.0) for w, v in vecs[0].items())
    return dot / (norms[0] * norms[1])


class RougeL:
    """ROUGE-L F (stemmed) of one prediction against one reference; builds the torchmetrics scorer once."""

    def __init__(self, stem: bool = True) -> None:
        from torchmetrics.text.rouge import ROUGEScore

        try:
            self._score = ROUGEScore(rouge_keys=("rougeL",), use_stemmer=stem)
        except ModuleNotFoundError as e:  # nltk is a dependency; a broken install says so clearly
            raise ModuleNotFoundError(f"stemmed ROUGE-L needs nltk (pip install nltk): {e}") from e

    def __call__(self, prediction: str, reference: str) -> float:
        return float(self._score(prediction, reference)["rougeL_fmeasure"])


def rouge_l(prediction: str, reference: str, stem: bool = True) -> float:
    return RougeL(stem)(prediction, reference)
