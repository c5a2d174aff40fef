"""A run as one OpenTelemetry trace, received by a real OTLP/HTTP receiver on 127.0.0.1 (tests/otlp_receiver.py):
the span tree matches the plan (the run, its plan, every agent once, sub-plans under their delegator, a
`chat` span per LLM call), the GenAI attributes and token counts are the record's, spans come from the
hub's and executors' processes, and a Ctrl-C or SIGTERM still delivers the spans that finished. Without the
variables nothing of OpenTelemetry is imported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the otel extra is not installed")
pytest.importorskip("opentelemetry.proto", reason="opentelemetry-proto (the dev extra) is not installed")

from metaagent_ray import MetaAgent  # noqa: E402
from metaagent_ray.record import RunRecord  # noqa: E402
from tests.adversarial import TWO_AND_JOIN, write_plan  # noqa: E402
from tests.conftest import DELEGATING_PLAN  # noqa: E402
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan  # noqa: E402
from tests.test_adversarial_signals import Terminal  # noqa: E402
from tests.test_run_endings import until  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_session")

SECRET = "secret-token-26"  # the collector's credentials: sent as a header, never on a span
OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
)


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch):
    """The receiver, named by the standard variables in this process (and the commands it starts)."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"authorization=Bearer {SECRET}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "metaagent-tests")
        yield receiver


def by_operation(spans: list[ReceivedSpan], operation: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.attributes.get("gen_ai.operation.name") == operation]


def agent_spans(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    """Each agent's `invoke_agent` span by its path; fails if an agent has more than one."""
    agents = by_operation(spans, "invoke_agent")
    counts = Counter(span.attributes["gen_ai.agent.id"] for span in agents)
    assert all(count == 1 for count in counts.values()), counts
    return {span.attributes["gen_ai.agent.id"]: span for span in agents}


def children(spans: list[ReceivedSpan], parent: ReceivedSpan, operation: str) -> list[ReceivedSpan]:
    return [span for span in by_operation(spans, operation) if span.parent_id == parent.span_id]


def test_a_run_is_one_trace_whose_tree_and_tokens_are_the_plans_and_the_records(receiver: OTLPReceiver, tmp_path: Path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(DELEGATING_PLAN))  # the coordinator answers it, and again for agent 0's sub-plan
    with MetaAgent(llm="fake", model="fake-model", llm_options={"plan": str(plan_file)}, max_depth=1) as agent:
        record = agent.run("Survey the field and check the facts", save=False)
    assert record.status == "ok"
    spans = receiver.spans  # the run returns once every process has sent its spans

    assert len({span.trace_id for span in spans}) == 1
    [run] = by_operation(spans, "invoke_workflow")
    assert run.name == "invoke_workflow" and run.parent_id == "" and run.attributes["metaagent.run.status"] == "ok"
    [plan] = children(spans, run, "plan")
    [coordinator_chat] = children(spans, plan, "chat")

    # every agent once, the top level under the run, the sub-plan (and its own plan) under the delegating agent
    agents = agent_spans(spans)
    assert sorted(agents) == ["0", "0.0", "0.1", "0.2", "1", "2"]
    assert all(agents[path].parent_id == run.span_id for path in ("0", "1", "2"))
    assert all(agents[path].parent_id == agents["0"].span_id for path in ("0.0", "0.1", "0.2"))
    [sub_plan] = children(spans, agents["0"], "plan")
    assert sub_plan.attributes["metaagent.plan.depth"] == 1 and len(children(spans, sub_plan, "chat")) == 1
    # an agent links to its dependencies' spans
    assert set(agents["2"].links) == {agents["0"].span_id, agents["1"].span_id}
    assert set(agents["0.2"].links) == {agents["0.0"].span_id, agents["0.1"].span_id}
    assert agents["0"].name == "invoke_agent researcher 0" and agents["0"].attributes["gen_ai.agent.name"] == "researcher 0"

    # GenAI attributes, and token counts equal to the record's
    chats = by_operation(spans, "chat")
    assert {span.name for span in chats} == {"chat fake-model"}
    for chat in chats:
        assert chat.attributes["gen_ai.provider.name"] == "fake" and chat.attributes["gen_ai.request.model"] == "fake-model"
        assert "gen_ai.input.messages" not in chat.attributes and "gen_ai.output.messages" not in chat.attributes
    assert record.coordinator is not None and record.coordinator.tokens is not None
    assert coordinator_chat.attributes["gen_ai.usage.input_tokens"] == record.coordinator.tokens.prompt
    assert coordinator_chat.attributes["gen_ai.usage.output_tokens"] == record.coordinator.tokens.completion
    sub_agents = record.agents[0].sub_run.agents if record.agents[0].sub_run else []
    for agent in [*record.agents, *sub_agents]:
        [chat] = children(spans, agents[str(agent.path)], "chat")
        assert agent.tokens is not None and chat.attributes["metaagent.caller"] == "agent"
        assert chat.attributes["gen_ai.usage.input_tokens"] == agent.tokens.prompt
        assert chat.attributes["gen_ai.usage.output_tokens"] == agent.tokens.completion
        assert agents[str(agent.path)].attributes["metaagent.agent.status"] == agent.status == "ok"

    # spans from the worker processes (the hub's, the executors'), all as the run's service
    driver = os.getpid()
    assert run.resource["process.pid"] == plan.resource["process.pid"] == driver
    assert all(span.resource["process.pid"] != driver for span in [*agents.values(), *children(spans, agents["0"], "chat")])
    assert {span.resource["service.name"] for span in spans} == {"metaagent-tests"}
    # the collector's credentials went with every export and never onto a span
    assert all(headers.get("authorization") == f"Bearer {SECRET}" for headers in receiver.headers)
    assert SECRET not in json.dumps([[span.attributes, span.resource] for span in spans], default=str)


def test_message_contents_are_on_spans_only_when_asked(receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    record = MetaAgent(llm="fake").execute(TWO_AND_JOIN, "q", save=False)
    chats = {span.parent_id: span for span in by_operation(receiver.spans, "chat")}
    for agent in record.agents:
        chat = chats[agent_spans(receiver.spans)[str(agent.path)].span_id]
        assert chat.name == "chat"  # the fake backend names no model
        assert agent.task in chat.attributes["gen_ai.input.messages"]
        assert json.loads(chat.attributes["gen_ai.output.messages"])[0]["parts"][0]["content"] == agent.output


WITHOUT_THE_EXTRA = """
import sys

class NotInstalled:  # the otel extra is not installed: no opentelemetry package is found
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
"""


def test_without_the_extra_the_variables_change_nothing_and_otel_is_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    ignored = WITHOUT_THE_EXTRA + "from metaagent_ray.tracing import exporting\nassert exporting(False) is None\n"
    done = subprocess.run([sys.executable, "-c", ignored], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    command = WITHOUT_THE_EXTRA + "from metaagent_ray.__main__ import main\nsys.argv = ['metaagent', 'plan', 'Compare A and B', '--llm', 'fake', '--otel']\nmain()\n"
    done = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --otel needs OpenTelemetry's SDK and OTLP/HTTP exporter: pip install 'metaagent-ray[otel]'"
    ]


def test_a_failed_llm_call_is_an_error_span_and_the_retry_another_span(receiver: OTLPReceiver):
    record = MetaAgent(llm="fake", llm_options={"fail": "0:1,1"}, retries=1).execute(TWO_AND_JOIN, "q", save=False)
    assert [agent.status for agent in record.agents] == ["ok", "failed", "ok"]
    agents = agent_spans(receiver.spans)
    tries = sorted(children(receiver.spans, agents["0"], "chat"), key=lambda span: span.attributes["metaagent.attempt"])
    assert [span.attributes.get("error.type") for span in tries] == ["LLMError", None]
    assert tries[0].status_code == 2 and "gen_ai.usage.input_tokens" not in tries[0].attributes
    assert agents["1"].status_code == 2 and agents["1"].attributes["error.type"] == "llm"
    [run] = by_operation(receiver.spans, "invoke_workflow")
    assert run.status_code == 2 and run.attributes["metaagent.run.status"] == "failed"


def test_without_the_variables_nothing_of_opentelemetry_is_imported(ray_cluster, monkeypatch: pytest.MonkeyPatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    script = (
        "import sys\n"
        "from metaagent_ray import MetaAgent\n"
        f"record = MetaAgent(llm='fake', address={ray_cluster.address!r}).execute({TWO_AND_JOIN!r}, 'q', save=False)\n"
        "assert record.status == 'ok', record.status\n"
        "print(sorted(name for name in sys.modules if name.startswith('opentelemetry')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_mid_run_still_delivers_the_spans_that_finished(
    receiver: OTLPReceiver, tmp_path: Path, latency_file, ray_cluster, signum: signal.Signals
):
    latency = latency_file({"default": 0.1, "1": 60.0})
    plan = write_plan(tmp_path / "plan.json", TWO_AND_JOIN)
    run_dir = tmp_path / "run"
    terminal = Terminal("exec", str(plan), "--llm", "fake", "--fake-latency", latency, "--run-dir", str(run_dir), "--address", ray_cluster.address)
    until(lambda: (run_dir / "agents" / "00-researcher.md").exists(), "finished agent 0")
    if signum == signal.SIGINT:
        terminal.type(b"\x03")  # Ctrl-C typed in its terminal
    else:
        terminal.process.send_signal(signum)  # as a supervisor stops it
    code, output = terminal.wait()
    assert code == 128 + signum, output[-3000:]
    assert RunRecord.model_validate_json((run_dir / "record.json").read_text()).status == "interrupted"

    spans = receiver.spans
    assert len({span.trace_id for span in spans}) == 1
    [run] = by_operation(spans, "invoke_workflow")
    assert run.status_code == 2 and run.attributes["error.type"] == "RunInterrupted"
    agents = agent_spans(spans)
    assert agents["0"].attributes["metaagent.agent.status"] == "ok" and len(children(spans, agents["0"], "chat")) == 1
    assert agents["1"].status_code == 2  # cut short with the run
    assert "2" not in agents  # it never started
