"""Which engine behind `--llm local`: one llama.cpp instance per slot, or one batching server per node?

- `llama-cpp-python` (the configuration before issue 13): one `Llama` per slot, each in its own
  process with 1 thread, as many slots as cores; requests beyond the slots queue.
- `xllamacpp` (the configuration since): one llama.cpp server in-process with 8 parallel slots that
  decode in shared batches, 1 thread (`--server-threads 1 2` adds a 2-thread server), driven
  through the backend's own client (`metaagent_ray.llm.local.LocalLLM`, streamed HTTP on 127.0.0.1).

Measured in ONE run, the engines taking turns at every step so background load hits both alike:

- throughput at 1, 2, 4 and 8 concurrent agents: the RESEARCHER prompts of the seed's query, built
  as the agents build them, `--max-tokens` each, sent at once; completion tokens / wall time, and
  the median time to the first streamed token (queueing included);
- memory per extra slot: anonymous memory (RssAnon; the mapped weights are file pages) of a fresh
  process holding 1 slot and holding 8, each after a plain and a schema-constrained call; the
  server's figure is set against the KV cache one slot takes (llm/local/model.py's kv_bytes_per_token);
- grammar validity: `--plans` coordinator calls with the real coordinator prompt and plan schema,
  each answer validated as an ExecutionPlan;
- with `--install`: `pip install --no-cache-dir ENGINE` in a fresh venv, timed (no pip cache: what a
  new user and CI wait for).

Run (needs both engines: pip install llama-cpp-python xllamacpp, and the local extra):

    python benchmarks/local_engines.py [--rounds 3] [--max-tokens 128] [--plans 6] [--server-threads 1] [--install]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

from metaagent_ray.agents import AgentContext, build_messages
from metaagent_ray.coordinator import coordinator_messages
from metaagent_ray.llm import LLMConfig, LLMRequest
from metaagent_ray.llm.llama_server import PLAIN_STOP, plain_prompt
from metaagent_ray.llm.local import LocalLLM, LocalOptions, LocalServer
from metaagent_ray.llm.local.model import kv_bytes_per_token, model_path
from metaagent_ray.paths import ROOT
from metaagent_ray.plan import AgentSpec, ExecutionPlan, Role, plan_json_schema
from metaagent_ray.settings import RunSettings

QUERY = "Compare Python, Rust, Go, Java, C#, Ruby, Elixir and Kotlin for web development"
LIMITS = RunSettings().limits()  # what a run with default settings gives its agents
TOPICS = ["Python", "Rust", "Go", "Java", "C#", "Ruby", "Elixir", "Kotlin"]
PLAN_QUERIES = [
    "Compare Python and Rust for web development",
    "Research the history of the bicycle, then write a short essay",
    "Plan a three-day trip to Lisbon",
    "Compare PostgreSQL and MongoDB for an online shop",
    "Write a business plan for a bakery",
    "Evaluate solar and wind power for a small farm",
    "Explain how vaccines work and critique common myths",
    "Design a study plan for learning Japanese in a year",
]
LEVELS = [1, 2, 4, 8]
MAX_AGENTS = 8
ENGINES = ["llama-cpp-python", "xllamacpp"]
PACKAGES = {"llama-cpp-python": "llama-cpp-python>=0.3", "xllamacpp": "xllamacpp"}
MiB = 1024**2
REPEAT_PENALTY_BEFORE = 1.15  # the local backend's answers before DRY replaced the repeat penalty


@dataclass(frozen=True)
class Answer:
    """One request's result as an engine saw it."""

    first_token_s: float  # from the batch's start: queueing counts
    prompt_tokens: int
    completion_tokens: int
    text: str


def researcher_requests(count: int, max_tokens: int) -> list[LLMRequest]:
    """The first `count` researcher calls of the query, built exactly as the agents build them."""
    requests = []
    for agent_id, topic in enumerate(TOPICS[:count]):
        spec = AgentSpec(role=Role.RESEARCHER, task=f"Research {topic} for web development")
        context = AgentContext(path=ROOT.child(agent_id), spec=spec, query=QUERY, llm=LLMConfig(backend="local"), limits=LIMITS)
        messages = build_messages(context, [])
        requests.append(LLMRequest(messages=messages, caller="agent", query=QUERY, agent_id=agent_id, max_tokens=max_tokens))
    return requests


def plan_requests(count: int) -> list[LLMRequest]:
    """Coordinator calls for `count` queries, with the coordinator's prompts and plan schema."""
    schema = plan_json_schema(MAX_AGENTS)
    return [
        LLMRequest(messages=coordinator_messages(query, MAX_AGENTS), caller="coordinator", query=query, json_schema=schema)
        for query in (PLAN_QUERIES * 4)[:count]
    ]


# --- llama-cpp-python: one instance per slot, in its own process -----------------------------------

_llama: Any = None  # this pool worker's instance


def _load_llama(path: str, ready: Any) -> None:
    global _llama
    from llama_cpp import Llama

    _llama = Llama(model_path=path, n_ctx=4096, n_threads=1, n_threads_batch=1, seed=0, verbose=False)
    _llama.create_completion("warm up", max_tokens=1)
    ready.wait()


def _llama_answer(job: tuple[float, LLMRequest]) -> Answer:
    """The pre-issue-13 backend's call: document prompt, stop sequences, the schema's grammar."""
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    started, request = job
    options = LocalOptions()
    grammar = None
    if request.json_schema is not None:
        gbnf = json_schema_to_gbnf(json.dumps(request.json_schema)).replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x7F\\x00-\\x1F]')
        grammar = LlamaGrammar.from_string(gbnf, verbose=False)
    stream = _llama.create_completion(
        plain_prompt(request.messages),
        stop=list(PLAIN_STOP),
        max_tokens=request.max_tokens or options.max_tokens,
        temperature=options.temperature,
        repeat_penalty=1.0 if grammar is not None else REPEAT_PENALTY_BEFORE,
        seed=options.seed,
        grammar=grammar,
        stream=True,
    )
    first, pieces = None, []
    for chunk in stream:
        if first is None:
            first = time.time() - started
        pieces.append(chunk["choices"][0]["text"])
    text = "".join(pieces)
    prompt_tokens = len(_llama.tokenize(plain_prompt(request.messages).encode()))
    completion_tokens = len(_llama.tokenize(text.encode(), add_bos=False)) if text else 0
    return Answer(first or 0.0, prompt_tokens, completion_tokens, text)


class LlamaCppPython:
    def __init__(self, path: Path, slots: int) -> None:
        context = multiprocessing.get_context("spawn")
        ready = context.Barrier(slots + 1)
        self.pool: Pool = context.Pool(slots, initializer=_load_llama, initargs=(str(path), ready))
        ready.wait()

    def run(self, requests: list[LLMRequest]) -> list[Answer]:
        started = time.time()
        return self.pool.map(_llama_answer, [(started, request) for request in requests], chunksize=1)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


# --- xllamacpp: one batching server, driven by the backend's client --------------------------------


class Xllamacpp:
    def __init__(self, path: Path, parallel: int, threads: int = 1) -> None:
        options = LocalOptions(n_threads=threads)
        self.server = LocalServer(str(path), options, parallel)
        self.client = LocalLLM(str(path), options, lambda: self.server.endpoint)

    def run(self, requests: list[LLMRequest]) -> list[Answer]:
        return asyncio.run(self._run(requests))

    async def _run(self, requests: list[LLMRequest]) -> list[Answer]:
        started = time.time()

        async def one(request: LLMRequest) -> Answer:
            first: list[float] = []
            response = await self.client.astream(request, lambda _text: first.append(time.time() - started) if not first else None)
            return Answer(first[0] if first else 0.0, response.prompt_tokens or 0, response.completion_tokens or 0, response.text)

        return list(await asyncio.gather(*(one(request) for request in requests)))

    def close(self) -> None:
        pass


# --- memory: a fresh process per engine and slot count ---------------------------------------------


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def probe(engine: str, slots: int, path: Path) -> None:
    """Hold `slots` slots in this process, use each with a plain and a schema call, print RssAnon."""
    before = rss_anon()
    plain = researcher_requests(slots, 64)
    plans = [replace(request, max_tokens=64) for request in plan_requests(slots)]
    if engine == "xllamacpp":
        runner = Xllamacpp(path, slots)
        runner.run(plain)
        runner.run(plans)
        used = rss_anon() - before
    else:  # one instance per slot; in this process so that one RssAnon counts them all
        global _llama
        from llama_cpp import Llama

        instances = [Llama(model_path=str(path), n_ctx=4096, n_threads=1, n_threads_batch=1, seed=0, verbose=False) for _ in range(slots)]
        for instance, request, plan in zip(instances, plain, plans):
            _llama = instance
            _llama_answer((time.time(), request))
            _llama_answer((time.time(), plan))
        used = rss_anon() - before
    print(json.dumps({"bytes": used}))


def memory_per_extra_slot(engine: str, path: Path, low: int = 1, high: int = 8) -> tuple[float, float, float]:
    """(MiB at `low` slots, MiB at `high` slots, MiB per extra slot)."""
    figures = []
    for slots in (low, high):
        result = subprocess.run(
            [sys.executable, __file__, "--probe", engine, str(slots), "--model", str(path)], capture_output=True, text=True, check=True
        )
        figures.append(json.loads(result.stdout.strip().splitlines()[-1])["bytes"] / MiB)
    return figures[0], figures[1], (figures[1] - figures[0]) / (high - low)


# --- install time --------------------------------------------------------------------------------


def install_seconds(engine: str) -> float:
    """`pip install --no-cache-dir PACKAGE` in a fresh venv: what a new machine waits for."""
    with tempfile.TemporaryDirectory() as directory:
        subprocess.run([sys.executable, "-m", "venv", directory], check=True)
        start_time = time.perf_counter()
        subprocess.run([f"{directory}/bin/pip", "install", "-q", "--no-cache-dir", PACKAGES[engine]], check=True)
        return time.perf_counter() - start_time


# --- the run -------------------------------------------------------------------------------------


def valid_plans(answers: list[Answer]) -> int:
    valid = 0
    for answer in answers:
        try:
            ExecutionPlan.model_validate_json(answer.text)
            valid += 1
        except ValueError:
            pass
    return valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency level (median reported)")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer length limit per request")
    parser.add_argument("--plans", type=int, default=6, help="coordinator calls per engine for grammar validity")
    parser.add_argument("--install", action="store_true", help="also time a no-cache install of each engine in a fresh venv")
    parser.add_argument("--server-threads", type=int, nargs="+", default=[1], help="xllamacpp configurations to run, by thread count")
    parser.add_argument("--model", default=None, help="a .gguf file (default: Gemma 3 270M)")
    parser.add_argument("--probe", nargs=2, metavar=("ENGINE", "SLOTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = model_path(args.model)
    if args.probe:
        probe(args.probe[0], int(args.probe[1]), path)
        return

    cores = len(os.sched_getaffinity(0))
    runners: dict[str, LlamaCppPython | Xllamacpp] = {f"llama-cpp-python, {cores} x 1 thread": LlamaCppPython(path, cores)}
    for threads in args.server_threads:
        runners[f"xllamacpp, {threads} thread{'s' if threads > 1 else ''}"] = Xllamacpp(path, max(LEVELS), threads)
    baseline = next(iter(runners))
    loads: list[float] = []
    results: dict[tuple[str, int], list[tuple[float, list[Answer]]]] = {}
    for _ in range(args.rounds):
        for level in LEVELS:
            requests = researcher_requests(level, args.max_tokens)
            for engine, runner in runners.items():
                loads.append(os.getloadavg()[0])
                begin = time.perf_counter()
                answers = runner.run(requests)
                results.setdefault((engine, level), []).append((time.perf_counter() - begin, answers))
    kv = kv_bytes_per_token(path)
    kv_slot = kv[0] * LocalOptions().n_ctx / MiB if kv else float("nan")
    print(f"Model: {path.name}; RESEARCHER prompts of {QUERY!r}, max_tokens={args.max_tokens}; median of {args.rounds} rounds.")
    print(f"Machine: {cores} cores; 1-minute load average during the runs {min(loads):.1f}-{max(loads):.1f}.")
    print(f"llama-cpp-python: one instance per slot, {cores} slots; xllamacpp: 1 server, {max(LEVELS)} parallel slots.\n")
    print("| engine | agents | wall s | completion tokens | completion tok/s | median time to first token s |")
    print("|---|---:|---:|---:|---:|---:|")
    throughput: dict[tuple[str, int], float] = {}
    for level in LEVELS:
        for engine in runners:
            rounds = results[(engine, level)]
            rates = [sum(answer.completion_tokens for answer in answers) / wall for wall, answers in rounds]
            wall, answers = sorted(rounds, key=lambda item: item[0])[len(rounds) // 2]
            throughput[(engine, level)] = statistics.median(rates)
            ttft = statistics.median(answer.first_token_s for answer in answers)
            tokens = sum(answer.completion_tokens for answer in answers)
            print(f"| {engine} | {level} | {wall:.2f} | {tokens} | {statistics.median(rates):.1f} | {ttft:.2f} |")
    print()
    for engine in list(runners)[1:]:
        ratios = ", ".join(f"{level}: {throughput[(engine, level)] / throughput[(baseline, level)]:.2f}x" for level in LEVELS)
        print(f"{engine} / {baseline} throughput by agents: {ratios}", flush=True)
    plans = plan_requests(args.plans)
    validity = {engine: valid_plans(runner.run(plans)) for engine, runner in runners.items()}
    for runner in runners.values():
        runner.close()
    print("\n| configuration | valid plans |")
    print("|---|---:|")
    for engine, valid in validity.items():
        print(f"| {engine} | {valid}/{args.plans} |", flush=True)
    memory = {engine: memory_per_extra_slot(engine, path) for engine in ENGINES}
    installs = {engine: install_seconds(engine) for engine in ENGINES} if args.install else {}
    print("\n| engine | RssAnon 1 slot MiB | RssAnon 8 slots MiB | per extra slot MiB | no-cache install s |")
    print("|---|---:|---:|---:|---:|")
    for engine in ENGINES:
        low, high, extra = memory[engine]
        install = f"{installs[engine]:.0f}" if engine in installs else "-"
        print(f"| {engine} | {low:.0f} | {high:.0f} | {extra:.0f} | {install} |")
    print(f"\nKV cache of one slot (n_ctx {LocalOptions().n_ctx}, llm/local/model.py): {kv_slot:.0f} MiB; "
          f"xllamacpp's extra slot beyond it: {memory['xllamacpp'][2] - kv_slot:.0f} MiB.")


if __name__ == "__main__":
    main()
