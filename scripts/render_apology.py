"""Re-render the pre-recorded apology (``src/callspeak/data/apology.ulaw``) with the offline voice.

The apology is what a caller hears when every voice engine failed; it ships pre-rendered so it
needs no engine at all. Run: ``.venv/bin/python scripts/render_apology.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from callspeak.tts.fallback import APOLOGY_TEXT
from callspeak.tts.piper import PiperService

TARGET = Path(__file__).resolve().parent.parent / "src" / "callspeak" / "data" / "apology.ulaw"


async def main() -> None:
    service = PiperService(cache_bytes=0)
    await service.start()
    try:
        audio = b"".join([chunk async for chunk in service.open().stream(APOLOGY_TEXT)])
    finally:
        await service.aclose()
    TARGET.write_bytes(audio)
    print(f"wrote {TARGET}: {len(audio)} bytes, {len(audio) / 8000:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
