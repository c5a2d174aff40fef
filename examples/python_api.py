"""The public API in a few lines: plan, execute, watch events, read the record.

    python examples/python_api.py            # the deterministic fake LLM
    python examples/python_api.py auto       # a real model: Ollama if it runs, else embedded llama.cpp
"""

from __future__ import annotations

import sys
from pathlib import Path

from metaagent_ray import AgentFinished, Event, MetaAgent, load_plan


def show(event: Event) -> None:
    """Print each agent as it finishes, with where Ray ran it."""
    if isinstance(event, AgentFinished):
        agent = event.agent
        print(f"agent {agent.id} {agent.role:<11} {agent.status:<6} layer {agent.layer}  inputs {agent.inputs_from}")


def main() -> None:
    llm = sys.argv[1] if len(sys.argv) > 1 else "fake"
    meta = MetaAgent(llm=llm, llm_options={"latency": 0.2} if llm == "fake" else {}, slots=4, on_event=show)

    plan = meta.plan("Compare Python, Rust, and Go for web development")
    print("planned layers:", plan.get_execution_layers())
    record = meta.execute(plan, "Compare Python, Rust, and Go for web development", save=False)
    print(f"run {record.status} in {record.makespan():.2f} s\n{record.final_output}\n")

    seed_workflow = load_plan(Path(__file__).parent / "business_plan.json")
    record = meta.execute(seed_workflow, "Create a business plan", save=False)
    print(f"business plan: {record.status}, layers: {record.layers}")


if __name__ == "__main__":
    main()
