"""Sentence splitting and chunk packing (pure)."""

from __future__ import annotations

import pytest

from callspeak.tts.sentences import chunk_text, group_sentences, has_words, split_sentences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello. How are you? Fine!", ["Hello.", "How are you?", "Fine!"]),
        ("Call Dr. Smith now. Thanks.", ["Call Dr. Smith now.", "Thanks."]),
        ("Pi is 3.14 today. Yes.", ["Pi is 3.14 today.", "Yes."]),
        ("Bring tools, e.g. a hammer. Done.", ["Bring tools, e.g. a hammer.", "Done."]),
        ("Made in the U.S. by Mrs. Jones.", ["Made in the U.S. by Mrs. Jones."]),
        ("Wait… what?! No way.", ["Wait…", "what?!", "No way."]),
        ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
        ("no punctuation at all", ["no punctuation at all"]),
        ("  Spaced.   Out.  ", ["Spaced.", "Out."]),
        ("", []),
        ("   \n ", []),
        ("J. R. R. Tolkien wrote it.", ["J. R. R. Tolkien wrote it."]),
        ("I said no. Goodbye.", ["I said no.", "Goodbye."]),
        ("Ask for No. 5 today.", ["Ask for No. 5 today."]),
        ("Forks, knives, etc. and plates.", ["Forks, knives, etc. and plates."]),
        ("We sell cars, vans, etc. Call us.", ["We sell cars, vans, etc.", "Call us."]),
        ("Open Jan. 3 at St. Mary's.", ["Open Jan. 3 at St. Mary's."]),
        ("Meet Smith vs. Jones. Then go.", ["Meet Smith vs. Jones.", "Then go."]),
        ("Really?!… Yes.", ["Really?!…", "Yes."]),
        ("The meeting is on Mon. Jan. 5 at noon.", ["The meeting is on Mon. Jan. 5 at noon."]),
        ("We close on Sat. Have a nice weekend.", ["We close on Sat.", "Have a nice weekend."]),
        ("Happy Martin Luther King Jr. Day to all.", ["Happy Martin Luther King Jr. Day to all."]),
        ("Apple Inc. CEO Tim Cook spoke.", ["Apple Inc. CEO Tim Cook spoke."]),
        ("It is on Fifth Ave. Building 3 is next.", ["It is on Fifth Ave. Building 3 is next."]),
        ("See Fig. A for details.", ["See Fig. A for details."]),
        ("Dots...everywhere... Done.", ["Dots...everywhere...", "Done."]),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_chunk_packs_whole_sentences_under_the_limit() -> None:
    text = "One two. Three four. Five six."
    assert chunk_text(text, 20) == ["One two. Three four.", "Five six."]
    assert chunk_text(text) == [text]


def test_chunk_splits_long_sentence_at_clauses_then_words() -> None:
    sentence = "alpha beta, gamma delta; epsilon zeta eta theta iota: kappa."
    chunks = chunk_text(sentence, 24)
    assert all(len(c) <= 24 for c in chunks)
    assert chunks[:2] == ["alpha beta, gamma delta;", "epsilon zeta eta theta"]
    assert " ".join(chunks) == sentence
    assert all(not c.startswith(" ") and not c.endswith(" ") for c in chunks)


def test_chunk_never_cuts_words_unless_one_word_is_too_long() -> None:
    words = "supercalifragilistic " * 3
    assert chunk_text(words, 25) == ["supercalifragilistic"] * 3
    assert chunk_text("x" * 10, 4) == ["xxxx", "xxxx", "xx"]


def test_chunk_of_2000_limit_keeps_text() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(300))
    chunks = chunk_text(text)
    assert len(chunks) > 1
    assert all(len(c) <= 2000 for c in chunks)
    assert " ".join(chunks) == text


def test_chunk_rejects_a_useless_limit() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        chunk_text("hi", 0)


def test_has_words_tells_text_to_say_from_punctuation_alone() -> None:
    assert has_words("Hi.") and has_words("42") and has_words("Ça va ?")
    assert not has_words("...") and not has_words("—") and not has_words(" !? ")


def test_short_sentences_are_grouped_to_at_least_min_chars_in_order() -> None:
    said = ["Yes.", "Okay.", "Let me check that.", "One moment.", "Done."]
    assert group_sentences(said, 12) == ["Yes. Okay. Let me check that.", "One moment. Done."]
    # a short rest joins the group before it: it would cost a text (a flush) of its own
    assert group_sentences(said, 18) == ["Yes. Okay. Let me check that. One moment. Done."]
    assert group_sentences([*said, "Bye."], 12) == [
        "Yes. Okay. Let me check that.",
        "One moment. Done. Bye.",
    ]
    assert group_sentences(said, 0) == said  # no grouping asked for
    assert group_sentences(said, 10_000) == [" ".join(said)]  # one group, shorter than asked
    assert group_sentences(["A long enough sentence."], 5) == ["A long enough sentence."]
    assert group_sentences([], 48) == []
    grouped = group_sentences(["Ok."] * 30, 48)
    assert all(len(g) >= 48 for g in grouped) and " ".join(grouped) == " ".join(["Ok."] * 30)


@pytest.mark.parametrize(
    "text",
    ["." * 200_000 + "x", "?" * 200_000 + "x", "a." * 100_000 + "1. Next.", "a " * 100_000],
)
def test_splitting_takes_time_in_proportion_to_the_text(text: str) -> None:
    """Runs of punctuation not followed by whitespace, or a long word of dots, were scanned
    again from each of their characters: 16 000 of them held the event loop for 5 s (the
    per-test timeout stops what would take hours at this length)."""
    sentences = split_sentences(text)
    assert "".join(sentences).replace(" ", "") == text.replace(" ", "")
