"""The streamed plan's scanner against `pydantic_core.from_json(text, allow_partial=True)`.

A coordinator's answer arrives in small pieces (a token is about four characters); after each piece
the runtime asks which agent objects are complete (plan_stream.py). Both ways are fed the same
500-agent plan in pieces of a few characters, and the cumulative time of all the feeds is measured;
both must find exactly the plan's agents. A partial parse cannot tell a complete last object from a
cut one (`[{"a": 1}` and `[{"a": 1},` read the same), so it finds an object once the next one
begins, or once a key after the array or the end of the text shows that the array closed.

    python benchmarks/plan_parsing.py [--agents 500] [--pieces 1 4 16 64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

from pydantic_core import from_json

from metaagent_ray.plan_stream import AgentObjects, StreamedPlan


class PartialJsonObjects:
    """`AgentObjects`' contract on pydantic_core's partial JSON: the whole text is parsed again after each piece."""

    def __init__(self) -> None:
        self._text = ""
        self._found = 0
        self._done = False

    def feed(self, piece: str) -> list[object]:
        if self._done:
            return []
        self._text += piece
        try:
            data = from_json(self._text, allow_partial=True)
        except ValueError:
            self._done = True
            return [None]  # not JSON: as the scanner's object that is not valid JSON
        agents = data.get("agents") if isinstance(data, dict) else None
        if not isinstance(agents, list):
            return []
        closed = list(data)[-1] != "agents" or (self._text.rstrip().endswith("}") and _whole(self._text))
        complete = len(agents) if closed else len(agents) - 1
        found, self._found = agents[self._found : complete], max(self._found, complete)
        self._done = closed
        return found


def _whole(text: str) -> bool:
    try:
        from_json(text)
    except ValueError:
        return False
    return True


def big_plan(count: int) -> str:
    """Groups of 24 researchers, each group with an analyzer, and a synthesizer of the analyses; tasks
    with quotes, brackets, escapes and non-ASCII text, as a model writes them."""
    agents: list[dict[str, object]] = []
    for index in range(count - 1):
        if index % 25 == 24:
            agents.append({"role": "ANALYZER", "task": f"Compare the {{findings}} of group {index // 25}", "depends_on": list(range(index - 24, index))})
        else:
            agents.append({"role": "RESEARCHER", "task": f'Research "topic {index}" [part {index % 7}] — costs, risks\\n', "depends_on": []})
    analyzers = [index for index, agent in enumerate(agents) if agent["role"] == "ANALYZER"]
    agents.append({"role": "SYNTHESIZER", "task": "Write the answer from every analysis", "depends_on": analyzers})
    return json.dumps({"description": f"{count} agents: researchers in groups, analyzers, a synthesis", "agents": agents}, ensure_ascii=False)


def pieces(text: str, size: int) -> list[str]:
    return [text[start : start + size] for start in range(0, len(text), size)]


def feed_all(make: Callable[[], object], chunks: list[str]) -> tuple[float, list[object]]:
    scanner = make()
    found: list[object] = []
    started = time.perf_counter()
    for chunk in chunks:
        found += scanner.feed(chunk)  # type: ignore[attr-defined]
    return time.perf_counter() - started, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--pieces", type=int, nargs="+", default=[1, 4, 16, 64], help="characters per piece")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    text = big_plan(args.agents)
    expected = json.loads(text)["agents"]
    print(f"{args.agents}-agent plan, {len(text):,} characters; median of {args.repeat} feeds of the whole answer")
    print("| characters per piece | pieces | scanner (plan_stream.AgentObjects) | pydantic_core.from_json(allow_partial=True) | StreamedPlan.feed in all (scanner, readiness, priority) |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.pieces:
        chunks = pieces(text, size)
        times: dict[str, list[float]] = {"scanner": [], "partial": [], "streamed": []}
        for _ in range(args.repeat):
            for name, make in (("scanner", AgentObjects), ("partial", PartialJsonObjects)):
                seconds, found = feed_all(make, chunks)
                assert found == expected, f"{name} with {size}-character pieces found other agents"
                times[name].append(seconds)
            streamed = StreamedPlan(max_agents=args.agents)
            started = time.perf_counter()
            ready = [agent for chunk in chunks for agent in streamed.feed(chunk)]
            times["streamed"].append(time.perf_counter() - started)
            assert len(ready) == args.agents
        cells = [f"{statistics.median(times[name]) * 1000:,.0f} ms" for name in ("scanner", "partial", "streamed")]
        print(f"| {size} | {len(chunks):,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
