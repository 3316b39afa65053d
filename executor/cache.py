"""An in-memory LRU of step results for steps with `cache: true`, shared across runs.

Keys are the operator and the fully rendered call (model call, tool name and arguments,
sub-pipeline and inputs) as canonical JSON, so two runs that render the same call share it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgspec

DEFAULT_MAX_ENTRIES = 1024
MISSING = object()


class ResultCache:
    """Least-recently-used map of call keys to results."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(op: str, *parts: Any) -> bytes | None:
        """Canonical key of a call; None when a part cannot be encoded (then no caching)."""
        try:
            return msgspec.json.encode([op, *parts], order="sorted")
        except (TypeError, msgspec.EncodeError):
            return None

    def get(self, key: bytes) -> Any:
        """The cached result, or `MISSING`."""
        if key not in self._entries:
            self.misses += 1
            return MISSING
        self.hits += 1
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: bytes, value: Any) -> None:
        """Store a result, evicting the least recently used beyond `max_entries`."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
