"""The deployment's pronunciation lexicon (LEXICON_FILE): words or phrases spoken as something else.

A file of entries, word -> replacement, applied to every request's text before it is chunked:

- JSON: one object, {"SQL": "sequel", "nginx": "engine x"};
- TSV (any other file name): one entry a line, `word<TAB>replacement`; blank lines and lines that
  start with `#` are skipped.

Matching is whole-word (an entry never matches inside a longer word: "cat" leaves "catalog" alone)
and longest-first. An entry written all in lower case matches any case ("nginx" matches "NGINX" and
"Nginx"); an entry with a capital letter matches only exactly as written ("US" -> "United States"
leaves the word "us" alone). Replacements are spoken as they are and are not looked up again.

A malformed file stops the worker at start (LexiconError names the file and the line), so a typo
never silently turns the lexicon off.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class LexiconError(ValueError):
    """The lexicon file cannot be used; the message names the file, the line and what to fix."""


@dataclass(frozen=True)
class Lexicon:
    exact: dict[str, str]  # entries with a capital letter: matched as written
    folded: dict[str, str]  # all-lower-case entries, matched in any case

    def __post_init__(self) -> None:
        words = sorted({*self.exact, *self.folded}, key=len, reverse=True)
        alternatives = [re.escape(w) if w in self.exact else f"(?i:{re.escape(w)})" for w in words]
        # Lookarounds, not \b: an entry may start or end with a non-word character ("C++", "a.m.").
        pattern = f"(?<!\\w)(?:{'|'.join(alternatives)})(?!\\w)" if words else None
        object.__setattr__(self, "_pattern", re.compile(pattern) if pattern else None)

    def __len__(self) -> int:
        return len(self.exact) + len(self.folded)

    def apply(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(self._replacement, text)

    def _replacement(self, m: re.Match) -> str:
        word = m.group(0)
        return self.exact.get(word) or self.folded[word.lower()]


EMPTY = Lexicon({}, {})


def build(entries: list[tuple[str, str, str]]) -> Lexicon:
    """A lexicon from (word, replacement, where) entries; `where` names the entry's place in errors."""
    exact: dict[str, str] = {}
    folded: dict[str, str] = {}
    for word, replacement, where in entries:
        word, replacement = word.strip(), " ".join(replacement.split())
        if not word:
            raise LexiconError(f"{where}: the word is empty; write `word<TAB>replacement`")
        if not replacement:
            raise LexiconError(f"{where}: '{word}' has an empty replacement; give what to say instead, or "
                               "remove the entry")
        if "\n" in word or "\t" in word:
            raise LexiconError(f"{where}: '{word!r}' holds a tab or line break; one word or phrase per entry")
        table = folded if word == word.lower() else exact
        if word in table:
            raise LexiconError(f"{where}: '{word}' is listed twice; keep one entry")
        table[word] = replacement
    return Lexicon(exact, folded)


def load(path: Optional[Path]) -> Lexicon:
    """The lexicon in `path` (None: no lexicon); LexiconError naming the line when it is malformed."""
    if path is None:
        return EMPTY
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LexiconError(f"LEXICON_FILE {path} cannot be read ({e}); give a UTF-8 JSON or TSV file, or unset "
                           "LEXICON_FILE") from None
    if Path(path).suffix.lower() == ".json":
        return build(_json_entries(raw, path))
    return build(_tsv_entries(raw, path))


def _json_entries(raw: str, path: Path) -> list[tuple[str, str, str]]:
    try:  # pairs, not a dict: duplicates are kept, so build() names them instead of the last one winning
        body = json.loads(raw, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise LexiconError(f"LEXICON_FILE {path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); "
                           'write one object, {"word": "replacement", ...}') from None
    if not isinstance(body, _Pairs):
        raise LexiconError(f'LEXICON_FILE {path}: the file must hold one JSON object, {{"word": "replacement"}}')
    lines = raw.splitlines()
    entries = []
    for word, replacement in body:
        where = f"LEXICON_FILE {path} line {_line_of(lines, word)}"
        if not isinstance(replacement, str):
            raise LexiconError(f"{where}: the replacement of '{word}' must be a string")
        entries.append((word, replacement, where))
    return entries


class _Pairs(list):
    """A JSON object's (key, value) pairs in order."""


def _line_of(lines: list[str], word: str) -> int:
    key = json.dumps(word, ensure_ascii=False)
    return next((i for i, line in enumerate(lines, 1) if key in line), 1)


def _tsv_entries(raw: str, path: Path) -> list[tuple[str, str, str]]:
    entries = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        where = f"LEXICON_FILE {path} line {n}"
        if len(fields) != 2:
            raise LexiconError(f"{where}: expected `word<TAB>replacement` (two fields separated by one tab), got "
                               f"{len(fields)} field(s): {line.strip()[:60]!r}")
        entries.append((fields[0], fields[1], where))
    return entries
