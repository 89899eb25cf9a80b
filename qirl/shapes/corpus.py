"""Text corpora of the Shapes grammar, for building vocabularies (the DiT's and the reward VLM's)."""

from __future__ import annotations

import numpy as np

from qirl.shapes.captions import random_t2i_record
from qirl.shapes.edits import random_edit_record


def grammar_corpus(n: int, seed: int) -> list[str]:
    """`2 n` captions and instructions from both splits, so every word the grammar can say is seen.

    One record in five comes from the creative split: its held-out shape/colour pairs use no new words,
    but its phrasings must be in the vocabulary all the same.
    """
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        split = "creative" if i % 5 == 0 else "train"
        texts.append(random_t2i_record(rng, split=split)["prompt"])
        texts.append(random_edit_record(rng, split=split)["prompt"])
    return texts
