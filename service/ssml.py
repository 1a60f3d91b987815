"""SSML input: a small, safe subset of the W3C Speech Synthesis Markup Language, turned into spoken text
and pauses.

Supported: <speak> (the root), <p> and <s> (sentence boundaries), <break time="500ms|1.5s"/> or
<break strength="none|x-weak|weak|medium|strong|x-strong"/>, <sub alias="...">written</sub>, and
<say-as interpret-as="characters|spell-out|digits|cardinal|ordinal">. Anything else (<phoneme>,
<prosody>, <emphasis>, <audio>, ...) is refused by name, with the list of what is supported: an
element that was silently dropped would change what is said without telling anyone.

Parsed with defusedxml: no DTDs, no entity declarations, no external references (no billion laughs,
no file or network reads); only XML's five predefined entities and character references. The
document's depth is bounded too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

SUPPORTED = ("speak", "p", "s", "break", "sub", "say-as")
SAY_AS = ("characters", "spell-out", "digits", "cardinal", "ordinal")
# Pauses of <break strength=...>, in seconds (SSML leaves the values to the processor).
STRENGTH_S = {"none": 0.0, "x-weak": 0.1, "weak": 0.25, "medium": 0.4, "strong": 0.7, "x-strong": 1.0}
MAX_DEPTH = 16
_TIME = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s)\s*")
_SPACE = re.compile(r"\s+")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NUMBER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[+-]?\d+(?:\.\d+)?")
# Attributes allowed on each element beyond its own: the root's declarations.
_ROOT_ATTRS = ("version", "xmlns", "{http://www.w3.org/XML/1998/namespace}lang",
               "{http://www.w3.org/2001/XMLSchema-instance}schemaLocation")


class SSMLError(ValueError):
    """The markup cannot be spoken as given; `code` is the API's error code, the message says what to fix."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Piece:
    """Text spoken without a pause inside it, then `pause_s` seconds of silence."""
    text: str
    pause_s: float = 0.0


@dataclass
class Spoken:
    """What a request says: silence first (`lead_s`), then its pieces in order."""
    pieces: list[Piece] = field(default_factory=list)
    lead_s: float = 0.0
    plain: bool = False  # plain text, not SSML
    written: int = 0  # characters of the document's own text, without markup (what usage counts)

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.pieces if p.text.strip())

    @property
    def pause_s(self) -> float:
        return self.lead_s + sum(p.pause_s for p in self.pieces)


@dataclass(frozen=True)
class Limits:
    max_break_s: float  # one <break>
    max_total_break_s: float  # all breaks of one request


# Input that is an SSML document starts with a <speak> tag, after an XML declaration or spaces and line
# breaks only (spelt out, not \s: the OpenAPI document states the same rule as an ECMA-262 pattern, whose
# \s is another set). Nothing else may come first, so no DTD ever reaches the parser either.
SSML_SPACE = r"[ \t\n\r]*"
SSML_START = rf"^{SSML_SPACE}(?:<\?xml[^<>]*\?>{SSML_SPACE})?<speak[ \t\n\r>/]"


def is_ssml(text: str) -> bool:
    return re.match(SSML_START, text) is not None


def parse(text: str, limits: Limits, words: Callable[[str], str] = lambda s: s) -> Spoken:
    """The spoken text and pauses of an SSML document (its root is <speak>).

    `words` is applied to the document's own text (the pronunciation lexicon), not to <sub> aliases or
    <say-as> output, which already say exactly what to speak.
    """
    if not is_ssml(text):
        raise SSMLError("invalid_ssml", "SSML input must be a document that starts with <speak> and ends with "
                        "</speak>; wrap the text in them, or send it with input_format \"text\"")
    try:
        root = fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except ParseError as e:
        line, column = e.position
        raise SSMLError("invalid_ssml", f"the SSML is not well-formed XML at line {line}, column {column + 1} "
                        f"({_reason(e)}); check that every tag is closed and that & and < in text are written "
                        "&amp; and &lt;") from None
    except DefusedXmlException:
        raise SSMLError("invalid_ssml", "the SSML declares a DTD or entities, which are refused (they can expand "
                        "without bound or read files); remove the <!DOCTYPE ...> and use &amp; &lt; &gt; &quot; "
                        "&apos; or character references like &#233; only") from None
    if _local(root.tag) != "speak":
        raise SSMLError("invalid_ssml", f"the SSML root element is <{_local(root.tag)}>; wrap the text in "
                        "<speak>...</speak>")
    out = _Builder(limits, words)
    _check_attrs(root, (), _ROOT_ATTRS)
    out.children(root, 1)
    return out.done()


class _Builder:
    def __init__(self, limits: Limits, words: Callable[[str], str]):
        self.limits, self.words = limits, words
        self.spoken = Spoken()
        self.current: list[str] = []  # text of the piece being built
        self.written: list[str] = []  # the document's text as written (<sub> and <say-as>: their content)

    def done(self) -> Spoken:
        self._close_piece(0.0)
        self.spoken.written = len(_SPACE.sub(" ", "".join(self.written)).strip())
        return self.spoken

    def say(self, text: str | None, instead: str | None = None) -> None:
        """Text of the document, spoken through the lexicon, or as `instead` (an alias, say-as words)."""
        self.written.append(text or "")
        # Whitespace in markup is layout: runs of it (line breaks included) are one space.
        if instead is not None:
            self.current.append(_SPACE.sub(" ", instead))
        elif text:
            self.current.append(self.words(_SPACE.sub(" ", text)))

    def boundary(self) -> None:
        """The end of a sentence (<s>, <p>): a line break, which sentence chunking always splits at."""
        self.current.append("\n")

    def pause(self, seconds: float) -> None:
        if seconds <= 0:
            return
        total = self.spoken.pause_s + seconds
        if total > self.limits.max_total_break_s:
            raise SSMLError("break_too_long", f"the breaks add up to more than {self.limits.max_total_break_s:g} s "
                            "(SSML_MAX_TOTAL_BREAK_S); shorten them or split the text into several requests")
        self._close_piece(seconds)

    def _close_piece(self, pause_s: float) -> None:
        text = "".join(self.current).strip(" ")
        self.current = []
        if text.strip():
            self.spoken.pieces.append(Piece(text, pause_s))
        elif self.spoken.pieces:  # breaks in a row: one longer pause
            self.spoken.pieces[-1].pause_s += pause_s
        else:
            self.spoken.lead_s += pause_s

    def children(self, el: Element, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise SSMLError("invalid_ssml", f"the SSML nests elements more than {MAX_DEPTH} deep; flatten it")
        self.say(el.text)
        for child in el:
            self.element(child, depth + 1)
            self.say(child.tail)

    def element(self, el: Element, depth: int) -> None:
        tag = _local(el.tag)
        if tag in ("p", "s"):
            _check_attrs(el, (), _ROOT_ATTRS[2:3])
            self.boundary()
            self.children(el, depth)
            self.boundary()
        elif tag == "break":
            _check_attrs(el, ("time", "strength"))
            _no_content(el)
            self.pause(_break_seconds(el, self.limits))
        elif tag == "sub":
            _check_attrs(el, ("alias",))
            if "alias" not in el.attrib or len(el):
                raise SSMLError("invalid_ssml", '<sub> needs an alias attribute and plain text inside, e.g. '
                                '<sub alias="World Wide Web">WWW</sub>')
            self.say(el.text, instead=el.attrib["alias"])
        elif tag == "say-as":
            _check_attrs(el, ("interpret-as", "format", "detail"))
            if len(el):
                raise SSMLError("invalid_ssml", "<say-as> holds plain text only, no elements")
            self.say(el.text, instead=say_as(el.attrib.get("interpret-as", ""), el.text or ""))
        elif tag == "speak":
            raise SSMLError("invalid_ssml", "<speak> is the root element only; remove the inner <speak>")
        else:
            raise SSMLError("unsupported_ssml", f"the SSML element <{tag}> is not supported; supported: "
                            + ", ".join(f"<{t}>" for t in SUPPORTED)
                            + f" (say-as interpret-as: {', '.join(SAY_AS)}); remove it and keep its text")


def say_as(kind: str, text: str) -> str:
    """The words for <say-as interpret-as=kind>text</say-as>."""
    text = text.strip()
    if kind in ("characters", "spell-out"):
        return " ".join(ch.upper() for ch in text if not ch.isspace())
    if kind == "digits":
        return " ".join(_DIGIT_WORDS[int(ch)] if ch.isdigit() and ch.isascii() else ch
                        for ch in text if not ch.isspace())
    if kind in ("cardinal", "ordinal"):
        if not _NUMBER.fullmatch(text):
            raise SSMLError("invalid_ssml", f'<say-as interpret-as="{kind}"> needs a number like 1234 or 1,234.5; '
                            f"got '{text[:40]}'")
        import inflect

        engine = inflect.engine()
        number = text.replace(",", "")
        try:
            # No commas or "and" inside the number: a comma is a clause break to the chunker and the voice.
            return engine.number_to_words(engine.ordinal(number) if kind == "ordinal" else number, comma="",
                                          andword="")
        except inflect.NumOutOfRangeError:  # beyond the named powers of ten (decillions)
            raise SSMLError("invalid_ssml", f'<say-as interpret-as="{kind}"> reads whole parts of at most 36 digits; '
                            f"'{text[:40]}' has more: use interpret-as=\"digits\" or write it out") from None
    raise SSMLError("unsupported_ssml", f"<say-as interpret-as=\"{kind}\"> is not supported; use one of "
                    f"{', '.join(SAY_AS)}, or write the words out")


def _break_seconds(el: Element, limits: Limits) -> float:
    if "time" in el.attrib:
        m = _TIME.fullmatch(el.attrib["time"])
        if not m:
            raise SSMLError("invalid_ssml", f"<break time=\"{el.attrib['time'][:20]}\"> is not a duration; write "
                            'it like "500ms" or "1.5s"')
        seconds = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    else:
        strength = el.attrib.get("strength", "medium")
        if strength not in STRENGTH_S:
            raise SSMLError("invalid_ssml", f"<break strength=\"{strength[:20]}\"> is not one of "
                            f"{', '.join(STRENGTH_S)}")
        seconds = STRENGTH_S[strength]
    if seconds > limits.max_break_s:
        raise SSMLError("break_too_long", f"a <break> of {seconds:g} s is longer than the {limits.max_break_s:g} s "
                        "allowed for one break (SSML_MAX_BREAK_S); shorten it")
    return seconds


def _check_attrs(el: Element, allowed: tuple[str, ...], also: tuple[str, ...] = ()) -> None:
    for name in el.attrib:
        if name not in allowed and name not in also:
            known = ", ".join(allowed) or "none"
            raise SSMLError("unsupported_ssml", f"<{_local(el.tag)}> has an unsupported attribute "
                            f"'{_local(name)}' (supported: {known}); remove it")


def _no_content(el: Element) -> None:
    if (el.text or "").strip() or len(el):
        raise SSMLError("invalid_ssml", f"<{_local(el.tag)}> is empty; write it as <{_local(el.tag)} .../>")


def _local(name: str) -> str:
    """A tag or attribute without its namespace (SSML documents often declare the W3C one)."""
    return name.rsplit("}", 1)[-1]


def _reason(e: ParseError) -> str:
    return str(e).split(":", 1)[0]
