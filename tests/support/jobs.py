"""Reading a scheduler job's results in tests."""
from __future__ import annotations

import numpy as np


def sentence_audio(job) -> list[np.ndarray]:
    """The job's audio, one array per sentence, as its events deliver it."""
    out, current = [], []
    for event in job.results():
        current.append(event.audio)
        if event.sentence_ends:
            out.append(np.concatenate(current))
            current = []
    return out
