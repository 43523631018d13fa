"""The ``plan.json`` fingerprints of resumable builds (latent cache, regenerate, online rounds).

A build writes its fingerprint first and refuses to continue in a directory made with another one; this
module says *where* two fingerprints differ, for that error message.
"""

from __future__ import annotations

from typing import Any


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Sorted top-level keys whose values differ (a key missing on one side differs), followed by
    ``"key.sub"`` for the differing entries of every key whose values are dicts on both sides.

    >>> fingerprint_diff({"a": 1, "s": {"x": 1, "y": 2}}, {"a": 1, "s": {"x": 1, "y": 3}, "b": 0})
    ['b', 's', 's.y']
    """
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    nested = [
        f"{k}.{sub}"
        for k in keys
        if isinstance(old.get(k), dict) and isinstance(new.get(k), dict)
        for sub in sorted(set(old[k]) | set(new[k]))
        if old[k].get(sub) != new[k].get(sub)
    ]
    return keys + nested
