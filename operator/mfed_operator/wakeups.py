"""Coalesced wake-ups: at most one reconciliation of a round in flight and one queued behind it.

A burst of events (a hundred site Jobs finishing within a second, a SiteTask relabelled) must
cost a round one or two reconciliations, not one per event; and the timer (the safety net) and
an event must never reconcile the same round at the same time, or both would plan on the same
status and one would repeat the other's step. Plain asyncio: no kopf, no clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger("mfed.operator")

# How many times one wake-up may go round "reconcile, it changed something, reconcile again"
# before it leaves the rest to the next event or the timer: each step of a round (uploads
# verified -> Aggregating -> Succeeded -> next round created) is one pass, so a handful is a
# whole round's tail; the bound only stops a status that would never settle from spinning.
MAX_PASSES = 8

Run = Callable[[], Awaitable[bool]]  # one reconciliation; True when it changed the round


class Wakeups:
    def __init__(self, max_passes: int = MAX_PASSES) -> None:
        self._max_passes = max_passes
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._queued: set[Hashable] = set()
        self._tasks: dict[Hashable, asyncio.Task[None]] = {}
        self.passes = 0  # reconciliations run by wake-ups (for tests and benches)

    def lock(self, key: Hashable) -> asyncio.Lock:
        """The one lock of a round: whoever reconciles it (timer or wake-up) holds it."""
        return self._locks.setdefault(key, asyncio.Lock())

    def forget(self, key: Hashable) -> None:
        """The round is gone: drop its lock (unless someone holds it right now)."""
        lock = self._locks.get(key)
        if lock is not None and not lock.locked() and key not in self._tasks:
            del self._locks[key]

    def wake(self, key: Hashable, run: Run) -> None:
        """Reconcile `key` soon. Must be called on the event loop (kopf's handlers are)."""
        if key in self._tasks:
            self._queued.add(key)  # the running pass may have read the world before this event
            return
        self._tasks[key] = asyncio.get_running_loop().create_task(self._drain(key, run))

    def pending(self) -> int:
        return len(self._tasks)

    async def _drain(self, key: Hashable, run: Run) -> None:
        try:
            for _ in range(self._max_passes):
                self._queued.discard(key)
                self.passes += 1
                try:
                    changed = await run()
                except Exception:  # the timer retries; an event must not kill the loop
                    log.exception("reconciling %s after an event failed; the timer will retry", key)
                    changed = False
                if not changed and key not in self._queued:
                    break
        finally:
            del self._tasks[key]

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
