"""Caption cleaning: whitespace, length limits, UTF-8 validity, and the dedupe key.

:func:`clean` returns the cleaned caption or the reason it is dropped; reasons are counted by
the caller and reported in the manifest. Duplicates are judged on :func:`normalise` (Unicode
NFKC, case-folded, whitespace collapsed), so ``"A  Dog"`` and ``"a dog"`` are one caption.
"""

from __future__ import annotations

import unicodedata

DROP_REASONS = ("invalid_utf8", "empty", "too_short", "too_long", "duplicate")


def clean(raw: str | None, *, min_chars: int, max_chars: int) -> tuple[str | None, str | None]:
    """Clean one raw caption.

    Args:
        raw: the caption as read, or ``None`` when it was not valid UTF-8.
        min_chars: shortest caption kept (after cleaning).
        max_chars: longest caption kept.

    Returns:
        ``(caption, None)`` when kept, ``(None, reason)`` when dropped.
    """
    if raw is None:
        return None, "invalid_utf8"
    text = " ".join(raw.split())  # strip + collapse all Unicode whitespace
    if not text:
        return None, "empty"
    if len(text) < min_chars:
        return None, "too_short"
    if len(text) > max_chars:
        return None, "too_long"
    return text, None


def normalise(text: str) -> str:
    """The key two captions must share to count as duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())
