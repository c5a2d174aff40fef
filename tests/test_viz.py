"""Pictures of a run: layer colours, parallel agents on one row, labelled edges, a timeline."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from metaagent_ray.api import load_plan
from metaagent_ray.cli import app
from metaagent_ray.record import RunRecord
from metaagent_ray.run_directory import RunDirectory
from metaagent_ray.viz import colour, graph_svg, mermaid, timeline_svg
from tests.conftest import EXAMPLES


def finished_record() -> RunRecord:
    plan = load_plan(EXAMPLES / "business_plan.json")
    record = RunRecord.start(plan, "q")
    for agent in record.agents:
        agent.status, agent.started_at, agent.finished_at = "ok", 100.0 + agent.layer, 100.5 + agent.layer
    return record


def test_the_graph_colours_layers_aligns_parallel_agents_and_labels_edges():
    record = finished_record()
    svg = graph_svg(record.plan, record.agents)
    boxes = re.findall(r'<rect x="(\d+)" y="(\d+)" width="190" height="58" rx="8" fill="(#\w+)"', svg)
    assert len(boxes) == 9
    for agent, (_, y, fill) in enumerate(boxes):
        layer = record.agents[agent].layer
        assert fill == colour(layer)
        assert all(other_y == y for other, (_, other_y, _) in enumerate(boxes) if record.agents[other].layer == layer)
    assert {int(y) for _, y, _ in boxes} == {20, 148, 276, 404}
    for agent, spec in enumerate(record.plan.agents):
        assert all(f"{dep}→{agent}</text>" in svg for dep in spec.depends_on)
    assert "Layer 0</text>" in svg and "4 in parallel" in svg and "Agent 8 · SYNTHESIZER ✓" in svg


def test_the_timeline_has_a_bar_per_agent_on_one_clock():
    svg = timeline_svg(finished_record())
    bars = re.findall(r'<rect x="([\d.]+)" y="\d+" width="([\d.]+)" height="16"', svg)
    assert len(bars) == 9
    assert min(float(x) for x, _ in bars) == 240.0  # label column + margin: the first start is at 0 s


def test_mermaid_and_the_viz_command(tmp_path: Path):
    record = finished_record()
    text = mermaid(record.plan)
    assert text.startswith("flowchart TD") and "a4 -->|4→6| a6" in text and "classDef layer3" in text
    RunDirectory(tmp_path).write_record(record)
    result = CliRunner().invoke(app, ["viz", str(tmp_path)])
    assert result.exit_code == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["graph.mmd", "graph.svg", "record.json", "timeline.svg"]
