"""Input text: normalise it, reject what an engine cannot read, split long text into sentence chunks."""
from __future__ import annotations

import re
import unicodedata

# Sentence ends in English and Chinese (full-width) punctuation; the punctuation stays with its sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；…])[\"'”’）)\]]*\s*|\n+")
# Places to break a sentence that is still too long: clause punctuation, then whitespace.
_CLAUSE_END = re.compile(r"(?<=[,，、:：])\s*")
_WHITESPACE = re.compile(r"[ \t\r\f\v]+")


class TextError(ValueError):
    """The text cannot be synthesised as given; the message says what to change."""


def refused_char(ch: str) -> bool:
    """Characters text may not contain: controls (but line breaks and tabs), private use, invisible format
    characters other than joiners, lone surrogates. (The OpenAPI document's text pattern is built from it.)"""
    if ch in "\n\t\r":
        return False
    cat = unicodedata.category(ch)
    return cat in ("Cs", "Cc", "Co") or (cat == "Cf" and ch not in "\u200b\u200c\u200d\u2060\ufeff")


def normalize(text: str) -> str:
    """NFC-normalise, reject control characters, collapse runs of spaces, keep single line breaks."""
    text = unicodedata.normalize("NFC", text)
    for i, ch in enumerate(text):
        if not refused_char(ch):
            continue
        if unicodedata.category(ch) == "Cs":
            raise TextError(f"text contains a lone surrogate U+{ord(ch):04X} at position {i} (half of a UTF-16 "
                            "pair, not a character); send valid Unicode")
        raise TextError(f"text contains a control character U+{ord(ch):04X} at position {i}; remove it")
    text = text.replace("\ufeff", "").replace("\u200b", "")
    lines = [_WHITESPACE.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    text = "\n".join(line for line in lines if line)
    if not text:
        raise TextError("text is empty; send at least one word")
    return text


# Symbols a voice reads out ("$5", "50%", "#1", "a & b", "x + y"); other punctuation is only prosody.
_SPOKEN_SYMBOLS = frozenset("#%&@")


CJK_RANGES = (("\u3400", "\u4dbf"), ("\u4e00", "\u9fff"))  # what lang=auto takes for Chinese
# Letters and digits of the scripts an engine reads, by language: Latin (with accents) for English, and
# Chinese characters for Chinese. Text in other scripts alone would be read as noise or not at all.
# An engine that speaks a language not listed here (VoxCPM2's thirty) reads any script's letters and digits.
SCRIPTS = {"en": (("0", "9"), ("A", "Z"), ("a", "z"), ("\u00c0", "\u024f"), ("\u1e00", "\u1eff")),
           "zh": CJK_RANGES}


def has_speakable(text: str, languages: tuple[str, ...] = ("en", "zh")) -> bool:
    """Whether the text has anything to say in `languages`: a letter or digit of their scripts, or a
    symbol that is read out ("$5", "50%", "x + y").

    Punctuation alone ("...", "?!") would otherwise make an engine produce a breath of noise.
    (The OpenAPI document's text pattern is built from speakable_char.)
    """
    return any(speakable_char(ch, languages) for ch in text)


def speakable_char(ch: str, languages: tuple[str, ...] = ("en", "zh")) -> bool:
    cat = unicodedata.category(ch)
    if ch in _SPOKEN_SYMBOLS or cat in ("Sc", "Sm"):
        return True
    if any(lang not in SCRIPTS for lang in languages):
        return cat[0] in "LN"
    return any(lo <= ch <= hi for lang in languages for lo, hi in SCRIPTS[lang])


def split_sentences(text: str, max_chars: int, first_max: int = 0) -> list[str]:
    """Split into sentence-sized chunks of at most `max_chars`, merging short neighbours.

    first_max > 0: the first chunk is at most that long (its first sentence, else its first clause or
    words), so a stream's first audio comes after a short chunk, not a long one.
    """
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence) <= max_chars:
            pieces.append(sentence)
        else:
            pieces.extend(_split_long(sentence, max_chars))
    chunks = _merge_short(pieces, max_chars)
    if first_max and chunks and len(chunks[0]) > first_max:
        chunks[:1] = _split_head(chunks[0], first_max)
    return chunks


def _split_head(chunk: str, first_max: int) -> list[str]:
    """The chunk's first sentence (or, when longer than first_max, its first clause or words), and the rest."""
    first = next(s.strip() for s in _SENTENCE_END.split(chunk) if s.strip())
    if len(first) > first_max:
        first = _split_long(first, first_max)[0]
    rest = chunk[chunk.index(first) + len(first):].lstrip("\"'”’）)] ,，、:：")
    return [first, rest] if rest else [first]


def _split_long(sentence: str, max_chars: int) -> list[str]:
    out: list[str] = []
    for clause in _CLAUSE_END.split(sentence):
        clause = clause.strip()
        while len(clause) > max_chars:
            cut = clause.rfind(" ", 0, max_chars + 1)
            if cut <= 0:  # no space (e.g. Chinese without commas): hard cut
                cut = max_chars
            out.append(clause[:cut].strip())
            clause = clause[cut:].strip()
        if clause:
            out.append(clause)
    return out


def _merge_short(pieces: list[str], max_chars: int) -> list[str]:
    merged: list[str] = []
    for piece in pieces:
        if merged and len(merged[-1]) + 1 + len(piece) <= max_chars and len(merged[-1]) < max_chars // 3:
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    return merged


def has_cjk(text: str) -> bool:
    return any(lo <= ch <= hi for ch in text for lo, hi in CJK_RANGES)
