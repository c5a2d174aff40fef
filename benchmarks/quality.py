"""Answer quality of the embedded default model, end to end: does a run give a person something to read?

Runs a fixed set of queries (comparisons of 2-5 subjects, sequential "X, then Y" requests, plans with
named areas) through `MetaAgent.run` on the local backend (Gemma 3 270M unless --model says
otherwise) and reports, per query and in total:

- coverage: the share of the subjects the query enumerates that some agent's task names;
- loops cut: answers the loop guard cut at their first repeated sentence or paragraph;
- repeats: answers that still hold a repeated paragraph (what a reader would see);
- copies: answers that copy a prompt instruction (an 8-word run shared with the instruction files);
- examples: answers that copy a worked example of the base-model documents (an 8-word run);
- off topic: answers that never mention a content word of their task;
- tokens and wall time;
- with `--replan 0 1`: each query once per value, in turn on the same Ray and model, the rounds the
  joiner added, and a table of coverage, on-topic rate and wall time per value (what a replan costs).

Run:  python benchmarks/quality.py [--queries N] [--model FILE.gguf] [--show] [--replan N ...]
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from importlib import resources

from metaagent_ray import MetaAgent
from metaagent_ray.llm.bounds import cut_repetition
from metaagent_ray.record import AgentRecord
from metaagent_ray.subjects import enumerated_subjects

QUERIES = [
    "Compare Python and Rust for web development",
    "Compare cats and dogs as pets",
    "Compare Python, Rust, and Go for web development",
    "Evaluate PostgreSQL, MySQL and SQLite",
    "Compare Python, Rust, Go, and JavaScript for backend development",
    "Compare trains, planes, buses, cars, and bicycles for travel in Europe",
    "Compare solar and wind power",
    "Design full-stack architecture: frontend, backend, database, deployment",
    "Create a business plan with market research, financial model, and operational strategy",
    "Study the French Revolution, then use that to write a lesson plan",
    "Research healthy breakfasts, then write a weekly menu",
    "Explain how vaccines work",
]
SHINGLE = 8  # words in a run that counts as copied from a prompt
GENERIC = set(
    "a an and the of for to in on with from by as at or is are be this that these those them their its "
    "research compare analyze analyse write writes final answer report plan planning review integrate "
    "combine summary summarize using use based into about each all both one two three task output outputs".split()
)


def prompt_shingles(folders: tuple[str, ...] = ("", "roles")) -> set[tuple[str, ...]]:
    """Every 8-word run of the prompt files in `folders` (placeholders left out): by default the
    instructions; ("document",) gives the base-model documents' worked examples."""
    root = resources.files("metaagent_ray.prompts")
    runs: set[tuple[str, ...]] = set()
    for folder in folders:
        for path in (root / folder if folder else root).iterdir():
            if path.name.endswith(".md"):
                words = _words(re.sub(r"\{[a-z_]+\}", " ", path.read_text(encoding="utf-8")))
                runs |= {tuple(words[index : index + SHINGLE]) for index in range(len(words) - SHINGLE + 1)}
    return runs


def _words(text: str) -> list[str]:
    """Lower-case words; a hyphenated word is one word ("back-end" is "backend")."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("-", ""))


def copies_prompt(answer: str, shingles: set[tuple[str, ...]]) -> bool:
    words = _words(answer)
    return any(tuple(words[index : index + SHINGLE]) in shingles for index in range(len(words) - SHINGLE + 1))


def off_topic(agent: AgentRecord) -> bool:
    """The answer mentions none of its task's content words, in the singular or the plural ("cats": "cat").

    Words of one or two letters count only as names (capitalised in the task: Go, C), never as "in" or "it".
    """
    names = {name.lower() for name in re.findall(r"\b[A-Z][A-Za-z]?\b", agent.task)}
    subject = {_singular(word) for word in _words(agent.task) if word not in GENERIC and (len(word) > 2 or word in names)}
    answer = {_singular(word) for word in _words(agent.output)}
    return bool(subject) and not subject & answer


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def coverage(query: str, tasks: list[str]) -> tuple[int, int]:
    """(subjects some task names, subjects the query enumerates)."""
    subjects, _ = enumerated_subjects(query)
    text = " ".join(tasks).lower()
    return sum(subject.lower() in text for subject in subjects), len(subjects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=len(QUERIES), help="run the first N queries")
    parser.add_argument("--model", default=None, help="a GGUF file instead of the default Gemma 3 270M")
    parser.add_argument("--show", action="store_true", help="print every answer that is off topic or copies a prompt or an example")
    parser.add_argument("--replan", type=int, nargs="+", default=[0], help="run each query with each of these --replan values")
    args = parser.parse_args()
    print("$ python " + shlex.join(["benchmarks/quality.py", *sys.argv[1:]]) + "\n")
    shingles, examples = prompt_shingles(), prompt_shingles(("document",))
    rows = []
    # One MetaAgent per --replan value on one Ray and one model server; each query runs with each value in turn,
    # so both see the same machine.
    metas = {replan: MetaAgent(llm="local", model=args.model, replan=replan) for replan in args.replan}
    print("| query | replan | rounds | agents | subjects covered | loops cut | repeats | copies | examples | off topic | tokens | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for query in QUERIES[: args.queries]:
            for replan, meta in metas.items():
                rows.append(measure(meta, query, replan, args.show, shingles, examples))
                print_row(rows[-1])  # as it comes: a run cut short keeps the rows it measured
    finally:
        for meta in metas.values():
            meta.close()
    print_totals(rows, args.replan)


def measure(meta: MetaAgent, query: str, replan: int, show: bool, shingles: set[tuple[str, ...]], examples: set[tuple[str, ...]]) -> dict:
    """One run of `query`, as a row of the table."""
    start = time.perf_counter()
    record = meta.run(query, save=False)
    wall = time.perf_counter() - start
    answers = [agent for agent in record.agents if agent.status == "ok"]
    if show:
        for agent in answers:
            flags = [name for name, bad in (("off topic", off_topic(agent)), ("copies a prompt", copies_prompt(agent.output, shingles)),
                                             ("copies an example", copies_prompt(agent.output, examples))) if bad]
            if flags:
                print(f"  [{', '.join(flags)}] {agent.role} {agent.task!r}: {agent.output!r}", file=sys.stderr)
    covered, enumerated = coverage(query, [agent.task for agent in record.agents])
    print(f"done: {query} (--replan {replan}: {len(record.rounds)} rounds, {wall:.0f} s)", file=sys.stderr, flush=True)
    return {
        "query": query,
        "replan": replan,
        "rounds": len(record.rounds),
        "agents": len(record.agents),
        "covered": covered,
        "enumerated": enumerated,
        "cut": sum(agent.repetition_cut for agent in answers),
        "repeats": sum(cut_repetition(agent.output)[1] for agent in answers),
        "copies": sum(copies_prompt(agent.output, shingles) for agent in answers),
        "examples": sum(copies_prompt(agent.output, examples) for agent in answers),
        "off_topic": sum(off_topic(agent) for agent in answers),
        "answers": len(answers),
        "tokens": sum(agent.tokens.completion for agent in answers if agent.tokens),
        "wall": wall,
    }


def print_row(row: dict) -> None:
    covered = f"{row['covered']}/{row['enumerated']}" if row["enumerated"] else "-"
    print(
        f"| {row['query']} | {row['replan']} | {row['rounds']} | {row['agents']} | {covered} | {row['cut']} | {row['repeats']} | "
        f"{row['copies']} | {row['examples']} | {row['off_topic']} | {row['tokens']} | {row['wall']:.0f} |",
        flush=True,
    )


def print_totals(rows: list[dict], replans: list[int]) -> None:
    """Per --replan value its totals (and, given several, a table of them)."""
    totals = {replan: summary([row for row in rows if row["replan"] == replan]) for replan in replans}
    if len(replans) > 1:
        print("\n| --replan | runs that replanned | agents | subject coverage | on topic | tokens | wall (s) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for replan, total in totals.items():
            print(
                f"| {replan} | {total['replanned']} | {total['agents']} | {total['covered']}/{total['enumerated']} = {total['covered'] / max(1, total['enumerated']):.0%} | "
                f"{total['answers'] - total['off_topic']}/{total['answers']} = {(total['answers'] - total['off_topic']) / max(1, total['answers']):.0%} | "
                f"{total['tokens']} | {total['wall']:.0f} |"
            )
    for replan, total in totals.items():
        print(f"\n--replan {replan}: {total['line']}")


def summary(rows: list[dict]) -> dict:
    """One --replan value's totals, and the line that says them."""
    keys = ("agents", "covered", "enumerated", "cut", "repeats", "copies", "examples", "off_topic", "answers", "tokens", "wall")
    total = {key: sum(row[key] for row in rows) for key in keys}
    total["replanned"] = sum(row["rounds"] > 1 for row in rows)
    two_subject = [row for row in rows if row["enumerated"] == 2]
    total["line"] = (
        f"Subject coverage {total['covered']}/{total['enumerated']} = {total['covered'] / max(1, total['enumerated']):.0%}"
        f" (two-subject comparisons fully covered: {sum(row['covered'] == 2 for row in two_subject)}/{len(two_subject)}); "
        f"answers {total['answers']}: loops cut {total['cut']}, still repeating {total['repeats']}, copying a prompt {total['copies']}, copying a worked example {total['examples']}, "
        f"on topic {total['answers'] - total['off_topic']}/{total['answers']} = {(total['answers'] - total['off_topic']) / max(1, total['answers']):.0%}; "
        f"{total['tokens']} tokens; {total['wall']:.0f} s"
    )
    return total


if __name__ == "__main__":
    main()
