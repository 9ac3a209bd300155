"""Limits on what a client may send that are not settings (shared by the daemon and qvirsh)."""

from __future__ import annotations

from collections.abc import Iterable

# Params passed on as they are (a definition, a device, a raw QMP command) may nest objects
# and lists at most this deep. Deeper input is refused before anything walks it recursively.
MAX_JSON_DEPTH = 64
FREE_FORM_PARAMS = ("definition", "device", "command", "header", "disks")


def nested_deeper_than(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if `value` (parsed JSON) nests objects/lists more than `limit` levels deep.

    `{}` and `[]` are one level. Iterative, so any depth is safe to check."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False
