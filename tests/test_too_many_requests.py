"""TooManyRequests: a 429 rests the voice for its Retry-After, or a second, capped at a minute."""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers

from callspeak.tts.deepgram_errors import parse_error
from callspeak.tts.too_many_requests import (
    DEFAULT_REST,
    LONGEST_REST,
    TooManyRequests,
    parse_retry_after,
)
from tests.fakes import SettableClock

#: Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example date, as a Unix time.
EXAMPLE_DATE = 784111777.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("2", 2.0),
        (" 7 ", 7.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("-3", 0.0),  # (not valid; read as "now" rather than ignored)
        ("Sun, 06 Nov 1994 08:49:47 GMT", 10.0),
        ("Sun, 06 Nov 1994 08:49:27 GMT", 0.0),  # a date passed: now
        ("Sun, 06 Nov 1994 08:49:47", None),  # no zone: not HTTP's date
        ("soon", None),
        ("", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_retry_after_in_seconds_or_as_a_date(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, lambda: EXAMPLE_DATE) == seconds


def test_a_429_rests_a_second_when_it_says_nothing_and_only_the_first_starts_a_rest() -> None:
    clock = SettableClock()
    rest = TooManyRequests(clock)
    assert not rest.resting() and rest.remaining() == 0
    assert rest.refused(None)  # a rest starts: say so once
    assert rest.resting() and rest.remaining() == DEFAULT_REST
    clock.now += 0.5
    assert not rest.refused(None)  # within it: the rest goes on to a second from this one
    clock.now += DEFAULT_REST - 0.01
    assert rest.resting()
    clock.now += 0.01
    assert not rest.resting() and rest.remaining() == 0
    assert rest.refused(None)  # over: the next 429 starts another


def test_a_429_rests_for_its_retry_after_within_bounds_and_never_shortens_a_rest() -> None:
    """At most a minute; at least a second, even for ``Retry-After: 0`` or a date already past
    (a skewed clock): no rest would let every call send its next sentence at once again."""
    clock = SettableClock()
    rest = TooManyRequests(clock)
    rest.refused(5.0)
    rest.refused(0.0)  # a shorter one does not end the longer one under way
    assert rest.remaining() == 5.0
    rest.refused(3600.0)
    assert rest.remaining() == LONGEST_REST
    clock.now += LONGEST_REST
    assert not rest.resting()
    assert rest.refused(0.0)  # "now": the shortest rest still
    assert rest.remaining() == DEFAULT_REST


def test_a_429s_retry_after_reaches_the_error_even_beside_a_repeated_header() -> None:
    """From a plain dict in any case, and from websockets' ``Headers`` (a refused handshake),
    whose mapping view raises for a name sent twice."""
    body = b'{"err_code": "TOO_MANY_REQUESTS", "err_msg": "Too many requests."}'
    error = parse_error(429, body, {"Retry-After": "3"})
    assert error.retryable and error.retry_after == 3.0 and error.status == 429
    headers = Headers([("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("retry-after", "4")])
    assert parse_error(429, body, headers).retry_after == 4.0
    assert parse_error(429, body, {}).retry_after is None
    assert parse_error(503, b"busy", {"Retry-After": "3"}).retry_after is None  # 429's only
