"""`metaagent serve` through real HTTP (httpx) on 127.0.0.1: runs, their events, records and reports, cancel and
resume, one slot cap across many runs, bad bodies and unknown ids; the page in Chromium.

One service for the module, on the session's Ray with 8 of its slots; Serve is shut down at the end,
so the other tests find the cluster's slots free again.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from metaagent_ray import MetaAgent
from metaagent_ray.run_directory import RunDirectory
from metaagent_ray.serve import RunService, ServiceOptions, start_service
from tests.test_report import chromium, headless  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("ray_session")

SERVICE_SLOTS = 8


def chain_plan(length: int, topic: str = "step") -> dict:
    return {
        "description": f"a chain of {length}",
        "agents": [{"role": "RESEARCHER", "task": f"{topic} {index}", "depends_on": [index - 1] if index else []} for index in range(length)],
    }


def wide_plan(width: int) -> dict:
    return {"description": "wide", "agents": [{"role": "RESEARCHER", "task": f"topic {index}"} for index in range(width)]}


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    runs_dir = tmp_path_factory.mktemp("served-runs")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    service = start_service(ServiceOptions(port=port, slots=SERVICE_SLOTS, runs_dir=runs_dir, llm="fake"), on_notice=lambda text: None)
    yield service.url, runs_dir
    service.stop()


@pytest.fixture
def client(service: tuple[str, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service[0], timeout=60) as client:
        yield client


def events(client: httpx.Client, run_id: str) -> list[tuple[str, dict]]:
    """The run's server-sent events from its start to its end."""
    found: list[tuple[str, dict]] = []
    with client.stream("GET", f"/v1/runs/{run_id}/events", timeout=120) as response:
        assert response.status_code == 200
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                found.append((name or "", json.loads(line.removeprefix("data: "))))
    return found


def test_a_query_runs_and_its_events_record_and_report_are_served(client: httpx.Client, service: tuple[str, Path]):
    created = client.post("/v1/runs", json={"query": "Compare Python, Rust and Go for web development", "llm": "fake"})
    assert created.status_code == 200, created.text
    run_id = created.json()["id"]
    names = [name for name, _ in events(client, run_id)]
    assert names[-1] == "end" and names.count("end") == 1
    assert {"PlanningStarted", "PlanReady", "AgentStarted", "AgentFinished", "RunFinished"} <= set(names)
    assert events(client, run_id) == events(client, run_id)  # from the start, every time
    run = client.get(f"/v1/runs/{run_id}").json()
    assert run["status"] == "ok"
    assert run["record"] == json.loads((service[1] / run_id / "record.json").read_text())
    assert run["record"]["slots"] == SERVICE_SLOTS
    report = client.get(f"/v1/runs/{run_id}/report")
    assert report.status_code == 200 and "metaagent-ray run" in report.text
    assert run_id in [listed["id"] for listed in client.get("/v1/runs").json()]


def test_delete_mid_run_ends_it_interrupted_and_resume_finishes_it(client: httpx.Client, service: tuple[str, Path], latency_file):
    latency = latency_file({"default": 0.6})
    run_id = client.post("/v1/runs", json={"plan": chain_plan(8), "llm": "fake", "llm_options": {"latency": latency}}).json()["id"]
    with client.stream("GET", f"/v1/runs/{run_id}/events", timeout=120) as response:
        for line in response.iter_lines():
            if line == "event: AgentFinished":  # one agent done, the rest still to come
                break
    live = client.get(f"/v1/runs/{run_id}/report")
    assert live.status_code == 200 and 'http-equiv="refresh"' in live.text  # the report while it runs
    assert client.delete(f"/v1/runs/{run_id}").status_code == 200
    assert events(client, run_id)[-1][1]["status"] == "interrupted"
    run = client.get(f"/v1/runs/{run_id}").json()
    assert run["status"] == "interrupted" and run["record"]["status"] == "interrupted"
    finished = [agent for agent in run["record"]["agents"] if agent["status"] == "ok"]
    assert 1 <= len(finished) < 8
    resumed = MetaAgent.resume(service[1] / run_id, slots=2)
    assert resumed.status == "ok"
    assert {agent.id for agent in resumed.agents if agent.reused} == {agent["id"] for agent in finished}


def test_twenty_runs_at_once_and_a_run_of_another_driver_share_eight_slots_and_all_finish(service: tuple[str, Path], ollama_server):
    """The runs through HTTP, and one run of this process (as `metaagent run --address` to the cluster), on one cap."""
    ollama_server.delay = 0.5
    body = {"plan": wide_plan(6), "llm": "ollama", "llm_options": {"host": ollama_server.url}}
    ids: list[str] = []
    said: list[str] = []
    outside = MetaAgent(llm="ollama", llm_options={"host": ollama_server.url}, on_event=lambda event: said.append(str(getattr(event, "text", ""))))
    other_driver = threading.Thread(target=lambda: said.append(outside.execute(wide_plan(12), "q", save=False).status))
    other_driver.start()

    def post() -> None:
        with httpx.Client(base_url=service[0], timeout=60) as client:
            ids.append(client.post("/v1/runs", json=body).json()["id"])

    posts = [threading.Thread(target=post) for _ in range(20)]
    for thread in posts:
        thread.start()
    for thread in posts:
        thread.join()
    with httpx.Client(base_url=service[0], timeout=120) as client:
        ends = [events(client, run_id)[-1] for run_id in ids]
    other_driver.join()
    assert [end for end in ends if end[1]["status"] != "ok"] == []
    assert said[-1] == "ok" and any(text.startswith(f"🤝 Sharing the {SERVICE_SLOTS} LLM slots") for text in said)
    assert ollama_server.max_in_flight == SERVICE_SLOTS  # reached, never exceeded


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "query"),
        ({"query": "q", "max_agents": 0}, "max_agents"),
        ({"query": "q", "bogus": 1}, "bogus"),
        ({"query": "q", "slots": 3}, "slots"),
        ({"query": "q", "plan": chain_plan(1)}, "plan"),
        ({"plan": {"description": "d", "agents": [{"role": "RESEARCHER", "task": "t", "depends_on": "x"}]}}, "depends_on"),
    ],
)
def test_a_bad_body_is_422_naming_the_field(client: httpx.Client, body: dict, field: str):
    response = client.post("/v1/runs", json=body)
    assert response.status_code == 422
    assert field in response.text


@pytest.mark.parametrize("path", ["/v1/runs/nope", "/v1/runs/nope/events", "/v1/runs/nope/report", "/v1/runs/..%2Fetc"])
def test_an_unknown_id_is_404(client: httpx.Client, path: str):
    assert client.get(path).status_code == 404
    assert client.delete("/v1/runs/nope").status_code == 404


def test_a_restarted_service_lists_the_earlier_runs(client: httpx.Client, service: tuple[str, Path]):
    run_id = client.post("/v1/runs", json={"plan": chain_plan(2), "llm": "fake"}).json()["id"]
    assert events(client, run_id)[-1][1]["status"] == "ok"
    earlier = {run.id: run.status for run in RunService(service[1]).all()}  # a new service over the same directory
    assert earlier[run_id] == "ok"


def test_a_run_left_unfinished_by_a_stopped_process_is_listed_interrupted_with_its_resume_command(
    client: httpx.Client, service: tuple[str, Path]
):
    run_id = client.post("/v1/runs", json={"plan": chain_plan(2, "left"), "llm": "fake"}).json()["id"]
    assert events(client, run_id)[-1][1]["status"] == "ok"
    directory = RunDirectory(service[1] / run_id)
    record = json.loads(directory.record_file.read_text())
    directory.record_file.write_text(json.dumps({**record, "status": "running"}))  # as a checkpoint left by a killed service
    left = RunService(service[1]).find(run_id)
    assert left is not None and left.status == "interrupted" and left.error.endswith(f"metaagent resume {directory.path}")
    with directory.locked():  # a live process writes it: it is running there
        assert RunService(service[1]).find(run_id).status == "running"  # type: ignore[union-attr]


def test_the_page_lists_runs_and_links_to_their_reports_in_chromium(client: httpx.Client, service: tuple[str, Path], chromium: str):  # noqa: F811
    run_id = client.post("/v1/runs", json={"plan": chain_plan(2, "page"), "llm": "fake"}).json()["id"]
    assert events(client, run_id)[-1][1]["status"] == "ok"
    page = headless(chromium, "--dump-dom", f"{service[0]}/")
    assert page.returncode == 0, page.stderr
    assert f'href="/v1/runs/{run_id}/report"' in page.stdout
    report = headless(chromium, "--dump-dom", f"{service[0]}/v1/runs/{run_id}/report")
    assert "metaagent-ray run" in report.stdout and "page 1" in report.stdout
