"""Training-time guard: does the identity leak into answers to ordinary questions?

At each evaluation the model also answers two general questions and two identity probes. A
general answer that shares a long stretch of text with the model's own identity answer (longer
than anything they shared before training) is the identity hijacking an unrelated question.
"""

from __future__ import annotations

from difflib import SequenceMatcher

GUARD_GENERAL = ["How do I plant tomatoes?", "怎样种西红柿？"]
GUARD_IDENTITY = ["Who are you?", "你是谁？"]


def shared_text(a: str, b: str) -> str:
    m = SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return a[m.a:m.a + m.size]


def _weight(text: str) -> int:
    """Length that counts a CJK character as two letters: 5 Chinese characters ~ 10 letters."""
    return sum(2 if ord(c) > 0x2E80 else 1 for c in text.strip())


def leaks(general: list[str], identity: list[str], baseline: int = 0, min_weight: int = 12) -> list[str]:
    """The general answers that repeat a stretch of an identity answer longer than BASELINE."""
    found = []
    for g in general:
        longest = max((_weight(shared_text(g, i)) for i in identity), default=0)
        if longest >= max(min_weight, baseline + 4):
            found.append(g)
    return found


def overlap(general: list[str], identity: list[str]) -> int:
    return max((_weight(shared_text(g, i)) for g in general for i in identity), default=0)
