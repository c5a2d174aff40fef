"""`report.html`: one self-contained page that tells a run's whole story.

The query, the plan and its warnings, the rounds of a run that replanned (`--replan`), the graph, a
timeline of the whole run, and per agent its task, inputs, output, tokens and errors, with sub-runs
nested under their agent. No network, no
scripts: inline CSS and inline SVG only. Every string that came from a user or an LLM is escaped.
"""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape

from .llm import Usage
from .paths import AgentPath
from .record import AgentRecord, RunRecord, ready_at, walk_agents
from .viz import colour, graph_svg, measured_critical_path, round_labels, timeline_svg

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.query { font-size: 1.2em; background: #f4f6fb; border-left: 4px solid #4a6fd1; padding: 0.6em 0.9em; white-space: pre-wrap; }
.meta, .muted { color: #666; } .warning { color: #a15c00; } .error { color: #b00020; white-space: pre-wrap; }
table { border-collapse: collapse; } td, th { padding: 0.25em 0.8em; text-align: left; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.picture { overflow-x: auto; border: 1px solid #eee; padding: 0.5em; }
article.agent { border: 1px solid #ddd; border-left-width: 8px; border-radius: 6px; padding: 0.4em 1em; margin: 0.8em 0; }
article.agent h3 { margin: 0.3em 0; } article.agent.critical { box-shadow: 0 0 0 2px #000; }
.status { font-weight: bold; padding: 0 0.4em; border-radius: 4px; }
.status-ok { background: #d7f5dd; } .status-failed { background: #fbd5d9; } .status-skipped, .status-pending { background: #eee; }
pre { background: #fafafa; border: 1px solid #eee; padding: 0.6em; white-space: pre-wrap; word-break: break-word; max-height: 30em; overflow: auto; }
.sub-run { margin-left: 1.5em; padding-left: 1em; border-left: 3px dashed #bbb; }
"""


def report_html(record: RunRecord, *, reload_s: int | None = None) -> str:
    """The whole page for one run; `reload_s`: the browser loads it again that often (a run still going, `serve`)."""
    title = f"metaagent-ray: {record.query[:80]}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        *([f'<meta http-equiv="refresh" content="{reload_s}">'] if reload_s else []),
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        "<h1>metaagent-ray run</h1>",
        f'<p class="meta">{_run_meta(record)}</p>',
        f'<div class="query" id="query">{escape(record.query)}</div>',
        '<h2 id="totals">Totals</h2>',
        _totals(record),
        '<h2 id="plan">Plan</h2>',
        _plan_section(record),
        *_rounds_section(record),
        '<h2 id="graph">Graph</h2>',
        f'<div class="picture">{graph_svg(record.plan, record.agents, record.round_of())}</div>',
        '<h2 id="timeline">Timeline</h2>',
        '<p class="muted">Ray\'s start-up, the coordinator, and per agent the wait once its inputs were ready (grey) and its LLM call.</p>',
        f'<div class="picture">{timeline_svg(record)}</div>',
        '<h2 id="agents">Agents</h2>',
        _agents(record.agents, _origin(record), set(measured_critical_path(record)), round_labels(record.round_of())),
        '<h2 id="final">Final output</h2>',
        f"<pre>{escape(record.final_output)}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _origin(record: RunRecord) -> float:
    """The run's first moment: Ray's start-up, the coordinator, or the record's start, whichever came first."""
    coordinator_start = record.coordinator.started_at if record.coordinator else None
    return min(moment for moment in (record.ray_started_at, coordinator_start, record.started_at) if moment is not None)


def _run_meta(record: RunRecord) -> str:
    started = datetime.fromtimestamp(_origin(record), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    llm = " ".join(value for value in (record.llm.backend, record.llm.model) if value)
    fields = [
        f'status <span class="status status-{escape(record.status)}">{escape(record.status)}</span>',
        f"started {started}",
        f"LLM {escape(llm or 'unknown')}",
        f"slots {record.slots}" if record.slots else "",
        f"run directory {escape(record.run_dir)}" if record.run_dir else "",
    ]
    return " · ".join(field for field in fields if field)


def _llm_seconds(agent: AgentRecord) -> float:
    """Seconds this agent spent in its own LLM call (a delegating agent's sub-run counts on its own)."""
    if agent.reused or agent.sub_run is not None:
        return 0.0
    if agent.llm_ms is not None:
        return agent.llm_ms / 1000
    if agent.started_at is not None and agent.finished_at is not None:
        return agent.finished_at - agent.started_at
    return 0.0


def _totals(record: RunRecord) -> str:
    agents = list(walk_agents(record.agents))
    ok = sum(agent.status == "ok" for agent in agents)
    tokens = sum((agent.tokens for agent in agents if agent.tokens), Usage())
    coordinator_tokens = record.coordinator.tokens if record.coordinator else None
    llm_time = sum(_llm_seconds(agent) for agent in agents)
    span = record.makespan()
    wall = (record.finished_at - _origin(record)) if record.finished_at is not None else None
    rows = [
        (
            "agents ok",
            f"{ok} / {len(agents)}" + (f" ({len(agents) - len(record.agents)} in sub-runs)" if len(agents) > len(record.agents) else ""),
        ),
        ("agents' tokens (prompt + completion)", f"{tokens.prompt} + {tokens.completion} = {tokens.total}"),
        (
            "coordinator's tokens",
            f"{coordinator_tokens.prompt} + {coordinator_tokens.completion}" if coordinator_tokens else "–",
        ),
        ("agents' LLM time, summed", f"{llm_time:.2f} s"),
        ("agents' wall time (first start to last finish)", f"{span:.2f} s" if span is not None else "–"),
        ("whole run's wall time (Ray, coordinator, agents)", f"{wall:.2f} s" if wall is not None else "–"),
        ("speed-up over sequential (LLM time / agents' wall time)", f"{llm_time / span:.2f}x" if span else "–"),
    ]
    body = "".join(f'<tr><th>{name}</th><td class="num">{value}</td></tr>' for name, value in rows)
    return f"<table>{body}</table>"


def _plan_section(record: RunRecord) -> str:
    parts = [f"<p>{escape(record.plan.description) or '<span class=muted>(no description)</span>'}</p>"]
    layers = "".join(
        f'<li><span style="background:{colour(number)}">&nbsp;Layer {number}&nbsp;</span> '
        f"{', '.join(f'<a href=#agent-{agent}>{agent} {escape(record.plan.agents[agent].role.value)}</a>' for agent in layer)}</li>"
        for number, layer in enumerate(record.layers)
    )
    parts.append(f"<ul>{layers}</ul>")
    if record.warnings:
        parts.append("<ul>" + "".join(f'<li class="warning">{escape(warning)}</li>' for warning in record.warnings) + "</ul>")
    coordinator = record.coordinator
    if coordinator is not None:
        took = ""
        if coordinator.started_at is not None and coordinator.finished_at is not None:
            took = f", {coordinator.finished_at - coordinator.started_at:.2f} s"
        fallback = ", fell back to the safe plan" if coordinator.fallback else ""
        parts.append(f'<p class="muted">Coordinator: {coordinator.attempts} attempt(s){took}{fallback}.</p>')
        if coordinator.errors:
            parts.append(
                "<p>Rejected answers:</p><ul>"
                + "".join(f'<li class="error">{escape(error)}</li>' for error in coordinator.errors)
                + "</ul>"
            )
    return "\n".join(parts)


def _rounds_section(record: RunRecord) -> list[str]:
    """Each round's agents and the joiner's judgement of it, when the joiner was asked (`--replan`)."""
    if all(round_.joiner is None for round_ in record.rounds):
        return []
    items = []
    for number, round_ in enumerate(record.rounds, 1):
        added = ", ".join(f'<a href="#agent-{agent}">{agent} {escape(record.agents[agent].role)}</a>' for agent in round_.agents)
        made_by = "the coordinator's plan" if number == 1 else "the joiner's replan"
        joiner = round_.joiner
        if joiner is None:
            judged = '<span class="muted">not judged (no replan left, or the run stopped first)</span>'
        elif joiner.decision is None:
            judged = f'<span class="warning">the joiner gave no valid decision ({escape(joiner.errors[-1])}); the run finished as it was</span>'
        else:
            judged = f"the joiner decided to <b>{joiner.decision}</b>: {escape(joiner.reason)}"
        items.append(f"<li><b>Round {number}</b> ({made_by}): agents {added}. Then {judged}.</li>")
    return ['<h2 id="rounds">Rounds</h2>', f"<ol>{''.join(items)}</ol>"]


def _anchor(path: AgentPath) -> str:
    return "agent-" + "-".join(str(step) for step in path.steps)


def _agents(agents: list[AgentRecord], origin: float, critical: set[int], rounds: dict[int, str] | None = None) -> str:
    """The agents' articles; `rounds` (id -> its round's label, `viz.round_labels`) for a run's top-level agents."""
    return "\n".join(_agent(agent, agents, origin, critical, (rounds or {}).get(agent.id, "")) for agent in agents)


def _agent(agent: AgentRecord, siblings: list[AgentRecord], origin: float, critical: set[int], round_label: str) -> str:
    path = agent.path
    status = escape(agent.status) + (" (reused)" if agent.reused else "")
    facts = [f"layer {agent.layer}{round_label}", f'<span class="status status-{escape(agent.status)}">{status}</span>']
    ready = ready_at(agent, siblings)
    if agent.started_at is not None and agent.finished_at is not None:
        facts.append(f"started at +{agent.started_at - origin:.2f} s, took {agent.finished_at - agent.started_at:.2f} s")
        if ready is not None and agent.started_at > ready:
            facts.append(f"queued {agent.started_at - ready:.2f} s")
    if agent.tokens:
        facts.append(f"tokens {agent.tokens.prompt} in, {agent.tokens.completion} out")
    if agent.llm_ms is not None:
        facts.append(f"LLM {agent.llm_ms / 1000:.2f} s")
    facts.append(f"attempts {agent.attempts}")
    if agent.node:
        facts.append(f"node {escape(agent.node[:12])}")
    if agent.id in critical:
        facts.append("<b>on the critical path</b>")
    inputs = [
        f'<a href="#{_anchor(path.parent.child(dep))}">agent {path.parent.child(dep)} ({escape(siblings[dep].role)})</a>'
        + ("" if dep in agent.inputs_from or agent.status != "ok" else " <span class=error>(missing)</span>")
        for dep in agent.depends_on
    ]
    parts = [
        f'<article class="agent{" critical" if agent.id in critical else ""}" id="{_anchor(path)}" style="border-left-color:{colour(agent.layer)}">',
        f"<h3>Agent {path} · {escape(agent.role)}</h3>",
        f'<p class="muted">{" · ".join(facts)}</p>',
        f'<p><b>Task:</b> <span class="task">{escape(agent.task)}</span></p>',
        f"<p><b>Inputs:</b> {', '.join(inputs) if inputs else 'none'}</p>",
    ]
    if agent.error:
        parts.append(f'<p class="error"><b>Error:</b> {escape(agent.error)}</p>')
    if agent.sub_run is not None:
        sub = agent.sub_run
        parts += [
            f'<div class="sub-run"><p><b>Delegated</b> to a sub-plan of {len(sub.agents)} agents: {escape(sub.plan.description)}</p>',
            f'<div class="picture">{graph_svg(sub.plan, sub.agents)}</div>',
            _agents(sub.agents, origin, set()),
            "</div>",
        ]
    if agent.output:
        parts += ["<p><b>Output:</b></p>", f'<pre class="output">{escape(agent.output)}</pre>']
    else:
        parts.append('<p><b>Output:</b> <span class="muted">none</span></p>')
    parts.append("</article>")
    return "\n".join(parts)
