"""WebSocket text frames as a client sends them: RFC 6455 §5.2, masked as §5.3 requires.

The emulator writes one frame per call every 20 ms, 10,000 a second in the benchmarks.
websockets builds each frame through a ``Frame`` object and a ``BytesIO`` and draws each 4-byte
masking key with a ``getrandom()`` system call of its own (``secrets.token_bytes``); for 200
calls that was almost a quarter of the emulator's CPU. Here the keys come from
``os.urandom`` 1,024 at a time — each key still fresh and unpredictable, as §5.3 asks — and a
frame is one concatenation. The masking itself is websockets' (its C speedup when built).
"""

from __future__ import annotations

import os
import struct

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets without its C extension
    from websockets.utils import apply_mask

__all__ = ["ClientTextFrames"]

_KEY_BYTES = 4
_FIN_TEXT = 0x81  # FIN bit, opcode 1 (text)
_MASKED = 0x80
_HEAD_16 = struct.Struct("!BBH")  # payload length 126 … 65,535
_HEAD_64 = struct.Struct("!BBQ")  # longer


class ClientTextFrames:
    """Builds whole (unfragmented), masked text frames from UTF-8 payloads."""

    def __init__(self, keys_per_draw: int = 1024) -> None:
        self._draw = keys_per_draw * _KEY_BYTES
        self._keys = b""
        self._next = 0  # offset of the next unused key in _keys

    def frame(self, payload: bytes) -> bytes:
        """The frame carrying ``payload`` (already UTF-8), with a masking key never used before."""
        if self._next >= len(self._keys):
            self._keys, self._next = os.urandom(self._draw), 0
        key = self._keys[self._next : self._next + _KEY_BYTES]
        self._next += _KEY_BYTES
        n = len(payload)
        if n < 126:
            head = bytes((_FIN_TEXT, _MASKED | n))
        elif n < 65536:
            head = _HEAD_16.pack(_FIN_TEXT, _MASKED | 126, n)
        else:
            head = _HEAD_64.pack(_FIN_TEXT, _MASKED | 127, n)
        return head + key + apply_mask(payload, key)
