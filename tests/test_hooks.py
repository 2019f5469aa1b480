"""Scripting a call in Python, and the menu example driven by DTMF through the emulator."""

from __future__ import annotations

import asyncio

from examples import menu

from callspeak.config import Settings
from callspeak.emulator import DialOptions, dial
from callspeak.events import CallEventRecord
from callspeak.hooks import Call, CallHooks
from callspeak.protocol import AccountSid, CallSid, Connected, MediaFormat, Start, StreamSid
from callspeak.server import create_app
from callspeak.session import CallSession
from callspeak.tts.sentences import split_sentences
from tests.conftest import serve_app
from tests.fakes import FakeProvider, FakeService, FakeTransport, tone_for

#: Seconds of fake speech per character: about as slow as a real voice.
PACE = 0.03


def spoken(text: str) -> bytes:
    """What the fake voice sends for ``text``: each sentence's tone, padded to whole frames."""
    out = b""
    for sentence in split_sentences(text):
        audio = tone_for(sentence, PACE)
        out += audio + b"\xff" * (-len(audio) % 160)
    return out


async def run_call(hooks: CallHooks, settings: Settings, **dial_options: object) -> bytes:
    app = create_app(settings, tts=FakeService(seconds_per_char=PACE), hooks=hooks)
    async with serve_app(app) as url:
        report = await dial(
            DialOptions(url=url.replace("http", "ws") + "/twilio", **dial_options)  # type: ignore[arg-type]
        )
    return bytes(report.played)


async def test_menu_example_answers_digits_and_repeats_on_star() -> None:
    played = await run_call(
        menu.hooks,
        Settings(validate_signatures=False, greeting="not spoken: the app decides"),
        dtmf=[(3.2, "2"), (4.0, "*")],
        quiet_seconds=0.5,
    )
    assert tone_for("not spoken: the app decides", PACE) not in played
    first_menu = spoken(menu.MENU)
    assert played.startswith(first_menu)  # the whole menu, before the first digit
    answer = spoken(f"You pressed 2. {menu.ANSWERS['2']}")
    rest = played[len(first_menu) :]
    assert rest.startswith(answer[:2400])  # the answer starts; * cleared it partway
    assert rest.endswith(first_menu)  # and * said the menu again


async def test_digit_pressed_mid_menu_stops_it_and_reads_back_the_digit() -> None:
    played = await run_call(
        menu.hooks,
        Settings(validate_signatures=False),
        dtmf=[(0.8, "1")],
        quiet_seconds=0.5,
    )
    first_sentence = spoken(split_sentences(menu.MENU)[0])
    answer = spoken(f"You pressed 1. {menu.ANSWERS['1']}")
    assert played.endswith(answer)
    menu_heard = played[: len(played) - len(answer)]
    assert 0 < len(menu_heard) < len(spoken(menu.MENU))  # cut short by the digit
    assert menu_heard.startswith(first_sentence[: len(menu_heard)])


async def test_interrupt_digit_clears_speech_without_any_app() -> None:
    text = "A long announcement. " * 6
    app_settings = Settings(validate_signatures=False, greeting=text.strip(), interrupt_digits="#")
    app = create_app(app_settings, tts=FakeService(seconds_per_char=PACE))
    async with serve_app(app) as url:
        report = await dial(
            DialOptions(
                url=url.replace("http", "ws") + "/twilio", dtmf=[(0.5, "#")], quiet_seconds=0.5
            )
        )
    assert len(report.clears) == 1 and report.clears[0] >= 0.5
    assert len(report.played) < len(spoken(text))


async def test_handlers_get_the_call_and_errors_do_not_end_it() -> None:
    hooks = CallHooks()
    seen: list[str] = []

    @hooks.on_start
    async def broken(call: Call) -> None:
        seen.append(call.parameters["who"])
        raise RuntimeError("a bug in the app")

    @hooks.on_start
    async def greet(call: Call) -> None:
        utterance = await call.say(f"Hello {call.parameters['who']}.", wait=True)
        seen.append(utterance.status.value)

    played = await run_call(
        hooks,
        Settings(validate_signatures=False),
        parameters={"who": "Ada"},
        quiet_seconds=0.3,
    )
    assert seen == ["Ada", "played"]
    assert played.rstrip(b"\xff") == tone_for("Hello Ada.", PACE)


async def test_a_digit_during_a_waiting_on_start_is_handled_once_on_start_returns() -> None:
    """A call's handlers run one at a time, in event order: the digit pressed while on_start
    waits for its greeting to be heard reaches on_dtmf after on_start, never alongside it."""
    hooks = CallHooks()
    order: list[str] = []

    @hooks.on_start
    async def greet(call: Call) -> None:
        order.append("start")
        await call.say("A greeting that takes a while to say.", wait=True)
        order.append("start done")

    @hooks.on_dtmf
    async def pressed(call: Call, digit: str) -> None:
        order.append(f"digit {digit}")

    await run_call(hooks, Settings(validate_signatures=False), dtmf=[(0.3, "5")], quiet_seconds=0.3)
    assert order == ["start", "start done", "digit 5"]


async def test_on_interrupted_gets_the_interruption_with_its_reason() -> None:
    hooks = CallHooks()
    seen: list[tuple[str, str]] = []

    @hooks.on_interrupted
    async def interrupted(call: Call, event: CallEventRecord) -> None:
        seen.append((event.call_sid, str(event.data["reason"])))

    text = "A long announcement. " * 6
    settings = Settings(validate_signatures=False, greeting=text.strip(), interrupt_digits="#")
    app = create_app(settings, tts=FakeService(seconds_per_char=PACE), hooks=hooks)
    async with serve_app(app) as url:
        report = await dial(
            DialOptions(
                url=url.replace("http", "ws") + "/twilio", dtmf=[(0.5, "#")], quiet_seconds=0.5
            )
        )
    assert seen == [(report.call_sid, "dtmf")]


async def test_a_handler_that_raises_cancelled_error_does_not_stop_the_calls_later_handlers() -> (
    None
):
    """A handler that awaits something cancelled (a task it started and cancelled, a gather
    whose child was cancelled) raises CancelledError although nobody cancelled the call's
    handlers. It was re-raised as if the call were ending: the lane ended, silently, and every
    later event of the call went unhandled. It is a failure of that handler, logged."""
    hooks = CallHooks()
    digits: list[str] = []

    @hooks.on_dtmf
    async def pressed(call: Call, digit: str) -> None:
        digits.append(digit)
        if digit == "1":
            helper = asyncio.ensure_future(asyncio.sleep(10))
            helper.cancel()
            await helper  # CancelledError: the helper's, not the lane's

    settings = Settings(validate_signatures=False, greeting="")
    await run_call(hooks, settings, dtmf=[(0.2, "1"), (0.5, "2")], duration=1.0)
    assert digits == ["1", "2"]


async def test_on_interrupted_is_not_called_for_speech_the_end_of_the_call_stopped() -> None:
    """on_interrupted is "not for reason call-ended". When the media socket drops under a send,
    the speaker ends its utterance as call-ended while the call's handler lane still runs, and
    the handler was called with it."""
    hooks = CallHooks()
    seen: list[str] = []

    @hooks.on_interrupted
    async def interrupted(call: Call, event: CallEventRecord) -> None:
        seen.append(str(event.data["reason"]))

    transport = FakeTransport()
    transport.drop_after = 3  # the peer is gone after three messages
    session = CallSession(transport, FakeProvider(), greeting="A long greeting. " * 20)
    reasons: list[str] = []
    session.add_listener(
        lambda e: reasons.append(str(e.data["reason"])) if e.type == "speech.interrupted" else None
    )
    hooks.attach(session)
    transport.push(Connected("Call", "1.0.0").to_json())
    transport.push(
        Start(
            1,
            StreamSid("MZ1"),
            AccountSid("AC1"),
            CallSid("CA1"),
            ("inbound",),
            {},
            MediaFormat("audio/x-mulaw", 8000, 1),
        ).to_json()
    )
    async with asyncio.timeout(5):
        await session.run()
    assert reasons == ["call-ended"]  # (the speech was stopped by the end of the call)
    assert seen == []
