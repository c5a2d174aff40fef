"""`metaagent`: a thin command line over the public API."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .api import DEFAULT_MAX_AGENTS, MetaAgent, load_plan
from .console import ConsoleView
from .errors import MetaAgentError
from .record import RunRecord

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Plan a task as a graph of role-based agents and run each agent on Ray as soon as its dependencies finish.",
)



@app.callback()
def _commands() -> None:
    """Plan a task as a graph of role-based agents and run each agent on Ray as soon as its dependencies finish."""


LlmOption = Annotated[str, typer.Option("--llm", help="LLM backend: fake, ollama, local or auto.")]
ModelOption = Annotated[Optional[str], typer.Option("--model", help="Model name (Ollama) or GGUF path (local).")]
SlotsOption = Annotated[
    Optional[int], typer.Option("--slots", min=1, help="At most this many agents call an LLM at once (a Ray custom resource).")
]
AddressOption = Annotated[Optional[str], typer.Option("--address", help="Connect to this Ray cluster instead of starting Ray locally.")]
RecordOption = Annotated[Optional[Path], typer.Option("--record", help="Also write the run record (JSON) to this file.")]
RunDirOption = Annotated[Optional[Path], typer.Option("--run-dir", help="Keep the run's files here (default runs/<UTC time>-<slug>/).")]
LatencyOption = Annotated[
    Optional[str], typer.Option("--fake-latency", help="Fake backend: seconds per call, or a JSON file of seconds by agent index.")
]
FailOption = Annotated[
    Optional[str], typer.Option("--fake-fail", help="Fake backend: inject faults, e.g. 3, 3:1, 3:hang, coordinator:garbage.")
]
MaxAgentsOption = Annotated[int, typer.Option("--max-agents", min=1, help="Refuse plans with more agents than this.")]
VerboseOption = Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging, and tracebacks on errors.")]
QuietOption = Annotated[bool, typer.Option("-q", "--quiet", help="Print only warnings and the final output.")]


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _guard(verbose: bool, action: callable) -> RunRecord | None:  # type: ignore[valid-type]
    """Run `action`, turning errors into one line and an exit code (a traceback only with -v)."""
    try:
        return action()
    except MetaAgentError as error:
        if verbose:
            logging.exception("details")
        _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as error:  # noqa: BLE001 - the last line of defence against tracebacks
        if verbose:
            raise
        _fail(f"unexpected {type(error).__name__}: {error} (run with -v for details)", 1)
    return None


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _fake_options(latency: str | None, fail: str | None) -> dict[str, str]:
    """The fake backend's options, only those given (other backends take none of them)."""
    return {key: value for key, value in (("latency", latency), ("fail", fail)) if value is not None}


def _exit_for(record: RunRecord | None) -> None:
    if record is not None and record.run_dir:
        print(f"\n💾 Run saved in {record.run_dir}", file=sys.stderr)
    if record is not None and record.status != "ok":
        raise typer.Exit(1)


@app.command("exec")
def exec_command(
    plan_file: Annotated[Path, typer.Argument(help="A plan: the coordinator's JSON.", show_default=False)],
    query: Annotated[str, typer.Option("--query", help="The user's request the agents work on (default: the plan's description).")] = "",
    llm: LlmOption = "fake",
    model: ModelOption = None,
    slots: SlotsOption = None,
    address: AddressOption = None,
    record: RecordOption = None,
    run_dir: RunDirOption = None,
    fake_latency: LatencyOption = None,
    fake_fail: FailOption = None,
    max_agents: MaxAgentsOption = DEFAULT_MAX_AGENTS,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run a plan file."""
    _configure_logging(verbose)

    def action() -> RunRecord:
        plan = load_plan(plan_file, max_agents=max_agents)
        agent = MetaAgent(
            llm, model=model, llm_options=_fake_options(fake_latency, fake_fail), slots=slots, address=address, max_agents=max_agents,
            on_event=ConsoleView(quiet=quiet), verbose=verbose,
        )
        return agent.execute(plan, query, run_dir=run_dir, record_path=record)

    _exit_for(_guard(verbose, action))


def main() -> None:
    app()
