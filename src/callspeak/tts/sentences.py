"""Split text into sentences, and pack sentences into size-limited chunks.

Pure functions, no I/O. TTS clients use :func:`chunk_text` to respect per-request character limits
(Deepgram Aura takes at most 2000 characters per request or ``Speak`` message); other modules use
:func:`split_sentences` to place one playback mark per sentence.

Splitting is heuristic, tuned for what a voice bot says: a sentence ends at ``.``, ``!``, ``?`` or
``…`` (optionally followed by closing quotes/brackets) when whitespace or the end of the text
follows. Titles (``Dr.``, ``St.``), dotted abbreviations (``e.g.``, ``U.S.``), initials and
decimals (``3.14``, which has no whitespace after the point) do not end a sentence; other common
abbreviations (``etc.``, ``No.``, ``Jan.``) do only when a capitalised word follows that is
not an abbreviation itself.
"""

from __future__ import annotations

import re

__all__ = [
    "DEFAULT_CHUNK_LIMIT",
    "chunk_text",
    "group_sentences",
    "has_words",
    "split_sentences",
]

#: Deepgram's documented per-request (and per-``Speak``) character limit.
DEFAULT_CHUNK_LIMIT = 2000

# Sentence-final punctuation, then optional closers, then whitespace or end of text. The run is
# matched whole (possessive, and never from inside it): else a long run of "." or "?" not
# followed by whitespace is scanned again from each of its characters, quadratic in its length.
_END = re.compile(r"(?<![.!?…])[.!?…]++[\"'”’)\]]*+(?=\s|$)")
# Words that end in a period without ending a sentence (compared lower-case, without the period):
# titles and the like, which a name, a number or a label follows...
_TITLES = frozenset(
    "mr mrs ms dr prof st mt vs gen col capt lt sgt rev hon sr jr inc co corp ltd dept fig "
    "approx est ave blvd rd".split()
)
# ... and words that end a sentence only when a capitalised word follows that is not one of
# these itself ("I said no. Goodbye.", "Closed on Sat. Have a nice weekend." but "No. 5",
# "etc. and", "on Mon. Jan. 5").
_ABBREVIATIONS = frozenset(
    "etc no nos jan feb mar apr jun jul aug sep sept oct nov dec "
    "mon tue wed thu fri sat sun".split()
)
_NEXT = re.compile(r"\s*[\"'“‘(\[]*(\S+)")
_CLAUSE = re.compile(r"(?<=[,;:])\s+")


def _dotted(word: str) -> bool:
    """``e.g.``, ``U.S.``, ``a.m.`` (the word ends in two letters each followed by a period) or a
    single initial ``J.``. String checks, not a regex searched from every position of the word,
    which is quadratic in a long word of dots."""
    if len(word) == 2 and word[0].isascii() and word[0].isupper():
        return True
    return (
        len(word) >= 4
        and word[-1] == word[-3] == "."
        and word[-2].isascii()
        and word[-2].isalpha()
        and word[-4].isascii()
        and word[-4].isalpha()
    )


def _is_abbreviation(text: str, end: int) -> bool:
    """True when the period ending at ``text[end - 1]`` belongs to an abbreviation."""
    if text[end - 1] != ".":
        return False
    start = end - 1
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:end].lstrip("\"'“‘([")
    if word.count(".") == 1:
        stem = word[:-1].lower()
        if stem in _TITLES:
            return True
        if stem in _ABBREVIATIONS:
            following = _NEXT.match(text, end)
            if following is None:
                return False  # the end of the text
            word = following.group(1)
            if not word[0].isupper():
                return True
            next_stem = word.lower().removesuffix(".")
            return next_stem in _TITLES or next_stem in _ABBREVIATIONS
    return _dotted(word)


def has_words(text: str) -> bool:
    """True when ``text`` has a letter or digit to say: a voice may rightly answer text of
    punctuation, dashes or emoji alone ("...", "—") with no audio at all."""
    return any(char.isalnum() for char in text)


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped, punctuation kept, empties dropped.

    ``"Hi Dr. Smith. It's 3.14 today!"`` gives ``["Hi Dr. Smith.", "It's 3.14 today!"]``. Text
    without sentence-final punctuation is one sentence.
    """
    sentences: list[str] = []
    start = 0
    for match in _END.finditer(text):
        if match.group(0) == "." and _is_abbreviation(text, match.end()):
            continue
        sentences.append(text[start : match.end()])
        start = match.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if s.strip()]


def group_sentences(sentences: list[str], min_chars: int) -> list[str]:
    """Consecutive ``sentences`` joined with single spaces into groups of at least ``min_chars``
    characters each, in order; a shorter rest joins the last group (it is a group of its own
    only when it is all there is). ``min_chars`` of 0 or less leaves them as they are.

    ``["Yes.", "Okay.", "Let me check that."]`` with 12 gives ``["Yes. Okay. Let me check that."]``
    — for a voice that pays per text it is asked for (see ``stream_min_chars`` in
    :mod:`callspeak.tts.base`).
    """
    if min_chars <= 0:
        return list(sentences)
    groups: list[str] = []
    current = ""
    for sentence in sentences:
        current = f"{current} {sentence}" if current else sentence
        if len(current) >= min_chars:
            groups.append(current)
            current = ""
    if current and groups:
        groups[-1] = f"{groups[-1]} {current}"  # a short rest costs no text of its own
    elif current:
        groups.append(current)
    return groups


def _split_words(text: str, limit: int) -> list[str]:
    """Whole words packed to ``limit``; a single word longer than ``limit`` is cut."""
    pieces: list[str] = []
    for word in text.split():
        pieces.extend(word[i : i + limit] for i in range(0, len(word), limit))
    return _pack(pieces, limit)


def _split_long(sentence: str, limit: int) -> list[str]:
    """Pieces of one over-long sentence: at clause punctuation first, then at whitespace."""
    pieces: list[str] = []
    for clause in _CLAUSE.split(sentence):
        pieces.extend([clause] if len(clause) <= limit else _split_words(clause, limit))
    return _pack(pieces, limit)


def _pack(pieces: list[str], limit: int) -> list[str]:
    """Join consecutive pieces with single spaces into chunks of at most ``limit`` characters."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if not current:
            current = piece
        elif len(current) + 1 + len(piece) <= limit:
            current = f"{current} {piece}"
        else:
            chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


def chunk_text(text: str, limit: int = DEFAULT_CHUNK_LIMIT) -> list[str]:
    """Whole sentences of ``text`` packed into chunks of at most ``limit`` characters, in order.

    A sentence longer than ``limit`` is split at clause punctuation (``,`` ``;`` ``:``), then at
    whitespace; a word is cut only when it alone exceeds ``limit``. Whitespace between sentences
    is normalised to one space. Empty or blank text gives ``[]``.
    """
    if limit < 1:
        raise ValueError(f"chunk limit must be at least 1, got {limit}")
    pieces: list[str] = []
    for sentence in split_sentences(text):
        pieces.extend([sentence] if len(sentence) <= limit else _split_long(sentence, limit))
    return _pack(pieces, limit)
