"""A phone menu in a few lines: say the options, repeat on *, read back the digit pressed.

Run it against the emulator:

    .venv/bin/callspeak serve --no-validate-signatures --hooks examples.menu:hooks
    .venv/bin/callspeak dial ws://127.0.0.1:5000/twilio --dtmf 6:2 --wav menu.wav
"""

from __future__ import annotations

from callspeak.hooks import Call, CallHooks

MENU = "For opening hours, press 1. For our address, press 2. To hear this again, press star."
ANSWERS = {
    "1": "We are open from nine to five, Monday to Friday.",
    "2": "We are at 12 Harbour Street.",
}

hooks = CallHooks()


@hooks.on_start
async def say_menu(call: Call) -> None:
    await call.say(MENU)


@hooks.on_dtmf
async def answer(call: Call, digit: str) -> None:
    await call.clear()  # whatever was playing, the caller has chosen
    if digit == "*":
        await call.say(MENU)
    elif digit in ANSWERS:
        await call.say(f"You pressed {digit}. {ANSWERS[digit]}")
    else:
        await call.say(f"You pressed {digit}. That is not an option. {MENU}")
