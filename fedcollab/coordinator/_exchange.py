"""One way the coordinator waits for replies: push, then poll with a short interval that grows.

Flower's own ``send_and_receive`` sleeps a fixed interval between polls (0.1 s in the simulation
engine's in-memory Grid, 3 s in the deployment Grid), so every exchange costs at least that much
however fast the nodes answer; protocols with several exchanges per round (SecAgg+, the tree
steps) paid it several times. :class:`PollingGrid` wraps any Grid: the first poll comes after
``first`` seconds, each later one after 1.5 times the last, up to ``longest``. A reply that is in
after a few milliseconds is picked up after a few milliseconds; a slow stage costs at most
``longest`` of extra wait. ``check`` is called before every push and between polls (a raise stops
the exchange: Ctrl-C in simulation).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: The first wait between polls, and the growth factor of later ones.
FIRST_POLL_SECONDS = 0.002
POLL_GROWTH = 1.5


class PollingGrid:
    """A Grid whose ``send_and_receive`` polls for replies with a short, growing interval."""

    def __init__(self, grid: Any, *, longest: float = 0.05, first: float = FIRST_POLL_SECONDS,
                 check: Callable[[], None] | None = None) -> None:
        if not (0 < first <= longest):
            raise ValueError(f"poll intervals: expected 0 < first <= longest, got first={first!r}, longest={longest!r}")
        self._grid, self._first, self._longest, self._check = grid, first, longest, check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Any:  # noqa: D102
        if self._check is not None:
            self._check()
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Any, *, timeout: float | None = None, until: Callable[[list[Any]], bool] | None = None) -> list[Any]:
        """Push, then pull until every reply is in, ``until(replies so far)`` holds, or ``timeout`` passes (``None``: no limit)."""
        if self._check is not None:
            self._check()
        ids = set(self._grid.push_messages(messages))
        end = time.monotonic() + timeout if timeout is not None else None
        wait = self._first
        out: list[Any] = []
        while ids:
            got = list(self._grid.pull_messages(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not ids or (until is not None and until(out)):
                break
            if self._check is not None:
                self._check()
            now = time.monotonic()
            if end is not None and now >= end:
                break
            time.sleep(wait if end is None else min(wait, max(end - now, 0.0)))
            wait = min(wait * POLL_GROWTH, self._longest)
        return out
