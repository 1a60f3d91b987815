"""VoxCPM2's control prefix: a parenthesised description at the very start of the text it is given.

VoxCPM2 designs a voice (zero-shot) or steers a cloned voice's delivery (reference cloning) from
"(description)" in front of the words to speak, e.g. "(a calm older woman, slow pace)Good evening.". The
model reads it from the text itself: its tokenizer has no special token for it ("(" is an ordinary
character), so the prefix is whatever bracketed group the sequence's text starts with. Two rules follow:

- the prefix is built here from the request's `instructions` only, as one bracketed group;
- text that is spoken (a chunk of the request, a voice's transcript) never starts with a bracket: a
  leading bracketed group is unwrapped ("(laughs) Hello" is spoken as "laughs, Hello"), since brackets
  are silent punctuation anyway. A chunk after a sentence split may start with "(" too, so every chunk
  goes through it, not only the request's first.
"""
from __future__ import annotations

from typing import Optional

# ASCII and full-width (Chinese) brackets: both open a parenthetical for the model.
_OPEN, _CLOSE = "(（", ")）"
_BRACKETS = str.maketrans({c: " " for c in _OPEN + _CLOSE})


def control_prefix(instructions: Optional[str]) -> str:
    """The bracketed prefix for `instructions` ("" for none). Brackets inside would end the prefix early and
    leave the rest of the description to be read aloud, so they become spaces."""
    words = " ".join((instructions or "").translate(_BRACKETS).split())
    return f"({words})" if words else ""


def as_spoken(text: str) -> str:
    """`text` with every leading bracketed group unwrapped, so it cannot be taken for a control prefix."""
    out = text.lstrip()
    while out and out[0] in _OPEN:
        closes = [i for i in (out.find(c) for c in _CLOSE) if i > 0]
        end = min(closes) if closes else len(out)
        inner, rest = out[1:end].strip(), out[end + 1:].lstrip()
        # A comma keeps the parenthetical's pause where the brackets were (none after its own punctuation).
        joint = ", " if inner and rest and inner[-1].isalnum() else " " if inner and rest else ""
        out = inner + joint + rest
    return out
