"""Seeds derived from names, so every random stream is a pure function of what it serves."""

from __future__ import annotations

import zlib


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from ``parts`` (e.g. ``(seed, "round3", rank)``); DALI seeds must be < 2**31."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF
