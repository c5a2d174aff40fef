"""The slot pool shared by many runs (`metaagent serve`): the cap over all runs is exact, and each policy's order."""

from __future__ import annotations

import asyncio
import random

import pytest

from metaagent_ray.executors import LAS_STEP_S, POLICIES, Policy, SlotPool


class Clock:
    """A clock the test moves: attained service in slot-seconds without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def served_order(pool: SlotPool, waiters: list[tuple[str, float]]) -> list[int]:
    """Queue `waiters` (run, priority) behind one held slot, then free it again and again: who got it, in order."""
    held = await pool.acquire(0, "holder")
    served: list[int] = []

    async def wait(position: int, run: str, priority: float) -> None:
        index = await pool.acquire(priority, run)
        served.append(position)
        pool.release(index, run)

    tasks = [asyncio.ensure_future(wait(position, run, priority)) for position, (run, priority) in enumerate(waiters)]
    await asyncio.sleep(0)
    pool.release(held, "holder")
    await asyncio.gather(*tasks)
    return served


def order(policy: Policy, waiters: list[tuple[str, float]], attained: dict[str, float] | None = None) -> list[int]:
    """The order a one-slot pool serves `waiters` in, after each run in `attained` held a slot that long."""
    clock = Clock()
    pool = SlotPool({0: 1}, policy, clock)

    async def main() -> list[int]:
        for run, seconds in (attained or {}).items():
            index = await pool.acquire(0, run)
            clock.now += seconds
            pool.release(index, run)
        return await served_order(pool, waiters)

    return asyncio.run(main())


WAITERS = [("big", 1.0), ("big", 5.0), ("small", 2.0), ("big", 3.0), ("small", 1.0)]


def test_fifo_serves_in_arrival_order():
    assert order("fifo", WAITERS) == [0, 1, 2, 3, 4]


def test_path_serves_the_longest_remaining_path_first_whatever_the_run():
    assert order("path", WAITERS) == [1, 3, 2, 0, 4]


def test_las_serves_the_run_with_the_least_attained_service_first():
    # "big" has held a slot for 30 s, "small" for 1 s: every waiter of "small" goes before any of "big"
    assert order("las", WAITERS, {"big": 30.0, "small": 1.0}) == [2, 4, 0, 1, 3]


def test_las_path_breaks_near_ties_in_attained_service_by_remaining_path():
    near = {"big": LAS_STEP_S * 0.6, "small": LAS_STEP_S * 0.2}  # the same step: longest path first
    assert order("las-path", WAITERS, near) == order("path", WAITERS)
    far = {"big": LAS_STEP_S * 5, "small": 0.0}  # steps apart: the run with less service first, each by path
    assert order("las-path", WAITERS, far) == [2, 4, 1, 3, 0]


def test_short_serves_the_run_with_the_fewest_agents_left_first_and_ages_the_others_by_their_slowdown():
    async def served(waited: float) -> list[int]:
        clock = Clock()
        pool = SlotPool({0: 1}, "short", clock)
        index = await pool.acquire(0, "earlier")  # a call of 1 s ends: the pool knows what a call takes
        clock.now = 1.0
        pool.release(index, "earlier")
        pool.add_work("big", 40, 10)  # alone on the one slot it takes 40 calls
        clock.now += waited
        pool.add_work("small", 5, 5)  # just come: no slowdown yet
        return await served_order(pool, WAITERS)

    assert asyncio.run(served(10.0)) == [2, 4, 1, 3, 0]  # "big" has waited a fraction of its time alone: "small" first
    assert asyncio.run(served(1000.0)) == [1, 3, 0, 2, 4]  # many times its time alone: "big" first, each by path


def test_attained_service_counts_the_calls_in_flight():
    clock = Clock()
    pool = SlotPool({0: 2}, "las", clock)

    async def main() -> None:
        first = await pool.acquire(0, "run")
        clock.now = 2.0
        await pool.acquire(0, "run")
        clock.now = 5.0
        assert pool.attained("run") == pytest.approx(5.0 + 3.0)
        pool.release(first, "run")
        clock.now = 6.0
        assert pool.attained("run") == pytest.approx(5.0 + 4.0)

    asyncio.run(main())


@pytest.mark.parametrize("policy", POLICIES)
def test_the_cap_over_all_runs_is_exact_and_every_agent_gets_a_slot(policy: Policy):
    slots = {0: 3, 1: 2}
    pool = SlotPool(slots, policy)
    generator = random.Random(7)
    held = {"now": 0, "most": 0}
    served: list[str] = []

    async def agent(run: str, priority: float) -> None:
        index = await pool.acquire(priority, run)
        held["now"] += 1
        held["most"] = max(held["most"], held["now"])
        await asyncio.sleep(generator.uniform(0, 0.003))
        held["now"] -= 1
        served.append(run)
        pool.release(index, run)

    async def main() -> None:
        await asyncio.gather(*(agent(f"run{number % 7}", generator.uniform(1, 10)) for number in range(200)))

    asyncio.run(main())
    assert held["most"] == sum(slots.values())
    assert len(served) == 200


@pytest.mark.parametrize("policy", ["las", "las-path", "short"])
def test_a_huge_run_does_not_starve_a_small_one(policy: Policy):
    """100 agents of a huge run with long paths wait first; the small run's one agent, arriving later, goes next."""
    clock = Clock()
    pool = SlotPool({0: 1}, policy, clock)

    async def main() -> list[int]:
        pool.add_work("huge", 101, 2)
        pool.add_work("small", 1, 1)
        index = await pool.acquire(0, "huge")
        clock.now += 10 * LAS_STEP_S  # the huge run has had its share already
        pool.release(index, "huge")
        return await served_order(pool, [*(("huge", 50.0) for _ in range(100)), ("small", 1.0)])

    assert asyncio.run(main())[0] == 100
