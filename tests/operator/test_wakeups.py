"""Coalesced wake-ups: bursts of events cost a round one or two passes, never overlapping ones."""

from __future__ import annotations

import asyncio

import pytest
from mfed_operator.wakeups import Wakeups


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_a_burst_of_wakeups_during_a_pass_costs_one_more_pass_not_one_each() -> None:
    async def scenario() -> list[str]:
        wakeups = Wakeups()
        started, release = asyncio.Event(), asyncio.Event()
        calls: list[str] = []

        async def reconcile() -> bool:
            calls.append("pass")
            started.set()
            await release.wait()
            return False

        wakeups.wake("r", reconcile)
        await started.wait()
        for _ in range(100):  # a hundred Jobs finishing while the first pass runs
            wakeups.wake("r", reconcile)
        release.set()
        while wakeups.pending():
            await asyncio.sleep(0)
        return calls

    assert run(scenario()) == ["pass", "pass"]


def test_a_pass_that_changed_the_round_is_followed_by_another_until_nothing_changes() -> None:
    async def scenario() -> int:
        wakeups = Wakeups()
        steps = iter([True, True, True, False])  # uploads verified, Aggregating, Succeeded, settled

        async def reconcile() -> bool:
            return next(steps)

        wakeups.wake("r", reconcile)
        while wakeups.pending():
            await asyncio.sleep(0)
        return wakeups.passes

    assert run(scenario()) == 4


def test_a_status_that_never_settles_stops_after_the_bound() -> None:
    async def scenario() -> int:
        wakeups = Wakeups(max_passes=5)

        async def reconcile() -> bool:
            return True

        wakeups.wake("r", reconcile)
        while wakeups.pending():
            await asyncio.sleep(0)
        return wakeups.passes

    assert run(scenario()) == 5


def test_a_failing_pass_is_logged_and_a_later_wakeup_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[int]:
        wakeups = Wakeups()
        seen: list[int] = []

        async def broken() -> bool:
            raise RuntimeError("API down")

        async def fine() -> bool:
            seen.append(1)
            return False

        wakeups.wake("r", broken)
        while wakeups.pending():
            await asyncio.sleep(0)
        wakeups.wake("r", fine)
        while wakeups.pending():
            await asyncio.sleep(0)
        return seen

    assert run(scenario()) == [1]
    assert "the timer will retry" in caplog.text


def test_the_timer_and_a_wakeup_never_reconcile_one_round_at_once_but_other_rounds_do() -> None:
    async def scenario() -> tuple[int, int]:
        wakeups = Wakeups()
        inside: dict[str, int] = {"a": 0, "b": 0}
        most: dict[str, int] = {"a": 0, "b": 0}
        both_rounds_at_once = 0

        async def reconcile(key: str) -> bool:
            nonlocal both_rounds_at_once
            async with wakeups.lock(key):
                inside[key] += 1
                most[key] = max(most[key], inside[key])
                both_rounds_at_once = max(both_rounds_at_once, sum(1 for v in inside.values() if v))
                await asyncio.sleep(0.01)
                inside[key] -= 1
            return False

        timer_passes = [reconcile("a"), reconcile("a"), reconcile("b")]  # what kopf's timers call
        for key in ("a", "b"):
            wakeups.wake(key, lambda key=key: reconcile(key))  # type: ignore[misc]
        await asyncio.gather(*timer_passes)
        while wakeups.pending():
            await asyncio.sleep(0)
        return max(most.values()), both_rounds_at_once

    most_in_one_round, rounds_at_once = run(scenario())
    assert most_in_one_round == 1
    assert rounds_at_once == 2
