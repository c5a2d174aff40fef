"""What Ray's actor calls cost the hub per agent: the price of letting Ray resolve the graph.

The hub (metaagent_ray/hub.py) runs each agent as two actor calls: `supervise` on itself, whose
top-level arguments are the dependencies' refs (Ray starts it once they exist), then the agent's
work on an executor. This measures, in one process pair and without the project's code, the hub
process's CPU time per agent for four shapes of the same chained graph (`--agents` in layers of
`--width`, each agent taking one ref of the layer before):

- `self call`: `supervise` on the hub itself, with the dependency's ref as its argument;
- `self call + executor`: that, then the work on an executor, awaited (what the hub does);
- `executor, refs as arguments`: the work submitted straight to the executor with the dependency's ref
  as its argument, not awaited in Python (Ray alone resolves; no place to hold a slot or a deadline);
- `executor, awaited`: the work submitted and awaited with no dependency (one call's round trip).

Run: python benchmarks/ray_calls.py [--agents 2000] [--width 100] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import ray


@ray.remote(num_cpus=0, max_concurrency=64)
class Executor:
    def run(self, value: int, *inputs: int) -> int:
        return value


@ray.remote(num_cpus=0, max_concurrency=100_000)
class Hub:
    def __init__(self, executor: Executor) -> None:
        self.me = ray.get_runtime_context().current_actor
        self.executor = executor

    async def supervise(self, value: int, *inputs: int) -> int:
        return value

    async def supervise_and_execute(self, value: int, *inputs: int) -> int:
        return await self.executor.run.remote(value, *inputs)

    async def measure(self, shape: str, agents: int, width: int) -> float:
        """Hub CPU seconds per agent for one shape."""
        started = time.process_time()
        layer = [ray.put(0)]
        for _ in range(agents // width):
            if shape == "self call":
                layer = [self.me.supervise.remote(index, layer[index % len(layer)]) for index in range(width)]
            elif shape == "self call + executor":
                layer = [self.me.supervise_and_execute.remote(index, layer[index % len(layer)]) for index in range(width)]
            elif shape == "executor, refs as arguments":
                layer = [self.executor.run.remote(index, layer[index % len(layer)]) for index in range(width)]
            else:
                await asyncio.gather(*(self._awaited(index) for index in range(width)))
                continue
        await asyncio.gather(*layer)
        return (time.process_time() - started) / (agents // width * width)

    async def _awaited(self, value: int) -> int:
        return await self.executor.run.remote(value)


SHAPES = ["self call", "self call + executor", "executor, refs as arguments", "executor, awaited"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    ray.init(include_dashboard=False, logging_level="ERROR")
    executor = Executor.remote()
    hub = Hub.remote(executor)
    ray.get(executor.run.remote(0))
    costs: dict[str, list[float]] = {shape: [] for shape in SHAPES}
    for _ in range(args.repeat):
        for shape in SHAPES:
            costs[shape].append(ray.get(hub.measure.remote(shape, args.agents, args.width)))
    print("| shape | hub CPU per agent (ms), each run |")
    print("|---|---|")
    for shape, runs in costs.items():
        print(f"| {shape} | {', '.join(f'{cost * 1000:.2f}' for cost in runs)} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
