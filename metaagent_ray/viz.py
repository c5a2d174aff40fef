"""Pictures of a run: the execution graph and a timeline, as self-contained SVG, and Mermaid text.

The graph follows the seed: one colour per layer, the agents of a layer side by side on one row
(they may run in parallel), edges labelled with the dependency, and each node's layer and status.
The timeline shows what the layers hide: each agent starts the moment its own dependencies finish.
"""

from __future__ import annotations

import re
from html import escape as escape_html

from .plan import ExecutionPlan
from .record import AgentRecord, RunRecord, ready_at

NOT_IN_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # characters XML 1.0 forbids

LAYER_COLOURS = ["#8ecae6", "#ffb703", "#90be6d", "#f28482", "#cdb4db", "#f9c74f", "#84a59d", "#a3c4f3"]
STATUS_MARK = {"ok": "✓", "failed": "✗", "skipped": "–", "pending": "…"}
NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 190, 58, 30, 70, 20


def escape(text: str) -> str:
    """Text for SVG, which is XML: escaped, and without the control characters XML forbids (a terminal
    colour code in a task would leave the picture unreadable)."""
    return escape_html(NOT_IN_XML.sub("\ufffd", text))


def colour(layer: int) -> str:
    return LAYER_COLOURS[layer % len(LAYER_COLOURS)]


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _row_order(plan: ExecutionPlan, layers: list[list[int]]) -> list[list[int]]:
    """Order each layer by the mean position of its agents' dependencies, to cross fewer edges."""
    position: dict[int, float] = {}
    ordered = []
    for layer in layers:

        def key(agent: int) -> tuple[float, int]:
            deps = plan.agents[agent].depends_on
            return (sum(position[dep] for dep in deps) / len(deps) if deps else -1.0, agent)

        row = sorted(layer, key=key)
        position.update({agent: index for index, agent in enumerate(row)})
        ordered.append(row)
    return ordered


def _on_curve(t: float, *points: tuple[float, float]) -> tuple[float, float]:
    """A point of a cubic Bezier curve: where an edge's label goes, near its source."""
    weights = [(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3]
    return sum(w * p[0] for w, p in zip(weights, points)), sum(w * p[1] for w, p in zip(weights, points))


def round_labels(rounds: dict[int, int] | None) -> dict[int, str]:
    """Agent id -> " · round N", for runs of several rounds (`--replan`); nothing for a run of one."""
    if not rounds or max(rounds.values()) == 1:
        return {}
    return {agent: f" · round {number}" for agent, number in rounds.items()}


def graph_svg(plan: ExecutionPlan, agents: list[AgentRecord] | None = None, rounds: dict[int, int] | None = None) -> str:
    """The DAG as SVG: rows are layers (parallel groups), colours are layers, edges say who feeds whom;
    `rounds` (agent id -> round) labels each agent with its round when there were several."""
    layers = _row_order(plan, plan.get_execution_layers())
    width = max(len(row) for row in layers) * (NODE_W + GAP_X) - GAP_X + 2 * MARGIN + 170
    height = len(layers) * (NODE_H + GAP_Y) - GAP_Y + 2 * MARGIN
    centre: dict[int, tuple[float, float]] = {}
    for number, row in enumerate(layers):
        row_width = len(row) * (NODE_W + GAP_X) - GAP_X
        left = 170 + MARGIN + (width - 170 - 2 * MARGIN - row_width) / 2
        for index, agent in enumerate(row):
            centre[agent] = (left + index * (NODE_W + GAP_X) + NODE_W / 2, MARGIN + number * (NODE_H + GAP_Y) + NODE_H / 2)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" font-family="sans-serif" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
    ]
    for number, row in enumerate(layers):
        y = MARGIN + number * (NODE_H + GAP_Y) + NODE_H / 2
        parallel = f"{len(row)} in parallel" if len(row) > 1 else "1 agent"
        parts.append(
            f'<text x="{MARGIN}" y="{y - 4:.0f}" font-weight="bold" fill="{colour(number)}" stroke="#333" stroke-width="0.3">Layer {number}</text>'
        )
        parts.append(f'<text x="{MARGIN}" y="{y + 12:.0f}" fill="#555">{parallel}</text>')
    for agent, spec in enumerate(plan.agents):
        x2, y2 = centre[agent]
        for dep in spec.depends_on:
            x1, y1 = centre[dep]
            top, bottom = y1 + NODE_H / 2, y2 - NODE_H / 2
            bend = (bottom - top) / 2
            parts.append(
                f'<path d="M{x1:.0f},{top:.0f} C{x1:.0f},{top + bend:.0f} {x2:.0f},{bottom - bend:.0f} {x2:.0f},{bottom:.0f}" '
                'fill="none" stroke="#555" stroke-width="1.2" marker-end="url(#arrow)"/>'
            )
            label_x, label_y = _on_curve(0.3, (x1, top), (x1, top + bend), (x2, bottom - bend), (x2, bottom))
            parts.append(f'<text x="{label_x + 4:.0f}" y="{label_y:.0f}" fill="#777" font-size="10">{dep}→{agent}</text>')
    layer_of, round_of = plan.layer_of(), round_labels(rounds)
    for agent, spec in enumerate(plan.agents):
        x, y = centre[agent]
        record = agents[agent] if agents else None
        status = f" {STATUS_MARK.get(record.status, '')}" if record else ""
        timing = ""
        if record and record.started_at is not None and record.finished_at is not None:
            timing = f" · {record.finished_at - record.started_at:.1f} s"
        stroke = "#c00" if record and record.status in ("failed", "skipped") else "#333"
        parts += [
            f"<g><title>{escape(spec.task)}</title>",
            f'<rect x="{x - NODE_W / 2:.0f}" y="{y - NODE_H / 2:.0f}" width="{NODE_W}" height="{NODE_H}" rx="8" '
            f'fill="{colour(layer_of[agent])}" stroke="{stroke}" stroke-width="1.5"/>',
            f'<text x="{x:.0f}" y="{y - 10:.0f}" text-anchor="middle" font-weight="bold">Agent {agent} · {spec.role.value}{status}</text>',
            f'<text x="{x:.0f}" y="{y + 6:.0f}" text-anchor="middle">{escape(_short(spec.task, 30))}</text>',
            f'<text x="{x:.0f}" y="{y + 21:.0f}" text-anchor="middle" fill="#333" font-size="10">layer {layer_of[agent]}{round_of.get(agent, "")}{timing}</text>',
            "</g>",
        ]
    parts.append("</svg>")
    return "\n".join(parts)


def _timed_rows(agents: list[AgentRecord]) -> list[tuple[AgentRecord, float | None]]:
    """Every agent that ran (sub-run agents after their parent), with the moment it could start."""
    rows = []
    for agent in agents:
        if agent.started_at is not None and agent.finished_at is not None:
            rows.append((agent, ready_at(agent, agents)))
        if agent.sub_run is not None:
            rows += _timed_rows(agent.sub_run.agents)
    return rows


def measured_critical_path(record: RunRecord) -> list[int]:
    """The top-level agents on the longest chain of dependent LLM calls: what bounded the run's length."""
    if any(agent.started_at is None or agent.finished_at is None for agent in record.agents):
        return []
    durations = {agent.id: agent.finished_at - agent.started_at for agent in record.agents}  # type: ignore[operator]
    return record.plan.critical_path(durations)[1]


def timeline_svg(record: RunRecord) -> str:
    """The whole run on one clock: Ray's start-up, the coordinator, and per agent its queue wait and LLM call.

    An agent's queue wait runs from the moment it could start (submitted, every dependency done) to
    the start of its LLM call: waiting for an LLM slot or a Ray worker. The critical path is outlined.
    """
    rows = _timed_rows(record.agents)
    phases = [(name, start, end) for name, start, end in _phases(record) if start is not None and end is not None]
    if not rows and not phases:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="300" height="40"><text x="10" y="25">no agent ran</text></svg>'
    moments = [moment for _, start, end in phases for moment in (start, end)]
    moments += [moment for agent, ready in rows for moment in (ready, agent.started_at, agent.finished_at) if moment is not None]
    start, span = min(moments), (max(moments) - min(moments)) or 1.0
    critical = set(measured_critical_path(record))
    round_of = round_labels(record.round_of())
    label_w, plot_w, row_h = 220, 640, 22
    count = len(phases) + len(rows)
    height = count * row_h + 2 * MARGIN + 50
    scale = plot_w / span

    def x_of(moment: float) -> float:
        return MARGIN + label_w + (moment - start) * scale

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 2 * MARGIN}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{label_w + plot_w + 2 * MARGIN}" height="{height}" fill="white"/>',
    ]
    axis = height - 50
    for step in range(6):
        x = MARGIN + label_w + step * plot_w / 5
        parts.append(f'<line x1="{x:.0f}" y1="{MARGIN}" x2="{x:.0f}" y2="{axis}" stroke="#ddd"/>')
        parts.append(f'<text x="{x:.0f}" y="{axis + 16}" text-anchor="middle" fill="#555">{step * span / 5:.1f} s</text>')
    row = 0
    for name, begin, end in phases:
        y = MARGIN + row * row_h
        parts.append(f'<text x="{MARGIN}" y="{y + 15}" font-style="italic">{name}</text>')
        parts.append(
            f'<rect x="{x_of(begin):.1f}" y="{y + 3}" width="{max((end - begin) * scale, 2):.1f}" height="{row_h - 4}" rx="3" fill="#bbb" stroke="#666">'
            f"<title>{name}: {end - begin:.2f} s</title></rect>"
        )
        row += 1
    for agent, ready in sorted(rows, key=lambda item: (item[0].started_at, item[0].path)):
        y = MARGIN + row * row_h
        began, ended = agent.started_at, agent.finished_at
        assert began is not None and ended is not None
        label = str(agent.path)
        indent = "    " * label.count(".")
        where = f"layer {agent.layer}" + (round_of.get(agent.id, "") if agent.path.depth == 0 else "")
        parts.append(
            f'<text x="{MARGIN}" y="{y + 15}" xml:space="preserve">{indent}Agent {escape(label)} · {escape(agent.role)} ({where})</text>'
        )
        if ready is not None and began > ready:
            parts.append(
                f'<rect x="{x_of(ready):.1f}" y="{y + 8}" width="{(began - ready) * scale:.1f}" height="6" fill="#ddd" stroke="#aaa">'
                f"<title>queued {began - ready:.2f} s: dependencies done, waiting for an LLM slot or a Ray worker</title></rect>"
            )
        on_path = agent.path.depth == 0 and agent.id in critical
        stroke = "#c00" if agent.status != "ok" else ("#000" if on_path else "#333")
        width = 3 if on_path else 1
        parts.append(
            f'<rect x="{x_of(began):.1f}" y="{y + 3}" width="{max((ended - began) * scale, 2):.1f}" height="{row_h - 6}" rx="3" '
            f'fill="{colour(agent.layer)}" stroke="{stroke}" stroke-width="{width}">'
            f"<title>{escape(agent.task)}: {ended - began:.2f} s, {escape(agent.status)}{', critical path' if on_path else ''}</title></rect>"
        )
        row += 1
    legend_y = axis + 36
    parts += [
        f'<rect x="{MARGIN}" y="{legend_y - 10}" width="24" height="12" rx="3" fill="{colour(0)}" stroke="#333"/>',
        f'<text x="{MARGIN + 30}" y="{legend_y}">LLM call (colour: layer)</text>',
        f'<rect x="{MARGIN + 200}" y="{legend_y - 7}" width="24" height="6" fill="#ddd" stroke="#aaa"/>',
        f'<text x="{MARGIN + 230}" y="{legend_y}">queued: ready, waiting for a slot or worker</text>',
        f'<rect x="{MARGIN + 520}" y="{legend_y - 10}" width="24" height="12" rx="3" fill="white" stroke="#000" stroke-width="3"/>',
        f'<text x="{MARGIN + 550}" y="{legend_y}">critical path</text>',
        "</svg>",
    ]
    return "\n".join(parts)


def _phases(record: RunRecord) -> list[tuple[str, float | None, float | None]]:
    """The run's own steps besides its agents: Ray's start-up, the coordinator's planning, the joiner's judgements."""
    coordinator = record.coordinator
    joiners = [(number, round_.joiner) for number, round_ in enumerate(record.rounds, 1) if round_.joiner is not None]
    return [
        ("Ray start-up", record.ray_started_at, record.ray_ready_at),
        ("Coordinator", coordinator.started_at if coordinator else None, coordinator.finished_at if coordinator else None),
        *((f"Joiner after round {number}", joiner.started_at, joiner.finished_at) for number, joiner in joiners),
    ]


def mermaid(plan: ExecutionPlan, rounds: dict[int, int] | None = None) -> str:
    """The graph as a Mermaid flowchart (GitHub renders it), one class per layer; rounds labelled as in `graph_svg`."""
    layer_of, round_of = plan.layer_of(), round_labels(rounds)
    lines = ["flowchart TD"]
    for agent, spec in enumerate(plan.agents):
        task = _short(spec.task, 40).replace('"', "'")
        where = f"layer {layer_of[agent]}{round_of.get(agent, '')}"
        lines.append(f'    a{agent}["Agent {agent}: {spec.role.value}<br/>{escape(task)}<br/>{where}"]:::layer{layer_of[agent]}')
    for agent, spec in enumerate(plan.agents):
        lines += [f"    a{dep} -->|{dep}→{agent}| a{agent}" for dep in spec.depends_on]
    lines += [f"    classDef layer{number} fill:{colour(number)}" for number in sorted(set(layer_of.values()))]
    return "\n".join(lines) + "\n"


def pictures(record: RunRecord) -> dict[str, str]:
    """A run's pictures by file name: graph.svg, timeline.svg and graph.mmd (the run directory writes them)."""
    rounds = record.round_of()
    return {
        "graph.svg": graph_svg(record.plan, record.agents, rounds),
        "timeline.svg": timeline_svg(record),
        "graph.mmd": mermaid(record.plan, rounds),
    }
