"""`metaagent`: a thin command line over the public API."""

from __future__ import annotations

import functools
import inspect
import logging
import shlex
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TextIO, get_type_hints

import typer

from .api import DEFAULT_MAX_AGENTS, MetaAgent, load_plan
from .console import ConsoleView, layer_lines
from .errors import ConfigError, MetaAgentError
from .record import RunRecord

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _commands() -> None:
    """Plan a task as a graph of role-based agents and run each agent on Ray as soon as its dependencies finish."""


@dataclass(frozen=True)
class RunOptions:
    """The options every command takes; each field's annotation is its command-line option."""

    llm: Annotated[
        str, typer.Option("--llm", help="LLM backend: auto (Ollama if it serves the model, else local), ollama, local or fake.")
    ] = "auto"
    model: Annotated[Optional[str], typer.Option("--model", help="Model name (Ollama) or GGUF file (local).")] = None
    ollama_host: Annotated[Optional[str], typer.Option("--ollama-host", help="Ollama server (default: $OLLAMA_HOST).")] = None
    slots: Annotated[
        Optional[int], typer.Option("--slots", min=1, help="At most this many agents call an LLM at once (a Ray custom resource).")
    ] = None
    address: Annotated[Optional[str], typer.Option("--address", help="Connect to this Ray cluster instead of starting Ray locally.")] = None
    record: Annotated[Optional[Path], typer.Option("--record", help="Also write the run record (JSON) to this file.")] = None
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Keep the run's files here (default runs/<UTC time>-<slug>/).")] = None
    fake_latency: Annotated[
        Optional[str], typer.Option("--fake-latency", help="Fake backend: seconds per call, or a JSON file of seconds by agent index.")
    ] = None
    fake_fail: Annotated[
        Optional[str], typer.Option("--fake-fail", help="Fake backend: inject faults, e.g. 3, 3:1, 3:hang, coordinator:garbage.")
    ] = None
    max_agents: Annotated[int, typer.Option("--max-agents", min=1, help="Refuse plans with more agents than this.")] = DEFAULT_MAX_AGENTS
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging, and tracebacks on errors.")] = False
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print only warnings and the final output.")] = False

    def llm_options(self) -> dict[str, str]:
        """Backend options from the flags that were given; a flag for another backend is an error."""
        fake = {key: value for key, value in (("latency", self.fake_latency), ("fail", self.fake_fail)) if value is not None}
        if fake and self.llm != "fake":
            raise ConfigError("--fake-latency and --fake-fail apply to --llm fake only")
        if self.ollama_host is not None and self.llm not in ("ollama", "auto"):
            raise ConfigError("--ollama-host applies to --llm ollama or auto only")
        return {**fake, **({"host": self.ollama_host} if self.ollama_host is not None else {})}

    def meta_agent(self, stream: TextIO | None = None) -> MetaAgent:
        """The API object these options describe, reporting to `stream` (default stdout)."""
        return MetaAgent(
            self.llm,
            model=self.model,
            llm_options=self.llm_options(),
            slots=self.slots,
            address=self.address,
            max_agents=self.max_agents,
            on_event=ConsoleView(stream, quiet=self.quiet),
            verbose=self.verbose,
        )


def with_run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give `command` every RunOptions flag; it receives them gathered as `options`."""
    names = [field.name for field in fields(RunOptions)]
    command_hints = get_type_hints(command, include_extras=True)
    own = [
        parameter.replace(annotation=command_hints[parameter.name])
        for parameter in inspect.signature(command).parameters.values()
        if parameter.name != "options"
    ]
    hints = get_type_hints(RunOptions, include_extras=True)
    shared = [
        inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=hints[field.name])
        for field in fields(RunOptions)
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        options = RunOptions(**{name: kwargs.pop(name) for name in names})
        logging.basicConfig(level=logging.DEBUG if options.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return _guarded(options.verbose, lambda: command(options=options, **kwargs))

    wrapper.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
    return wrapper


def _guarded(verbose: bool, action: Callable[[], Any]) -> Any:
    """Run `action`, turning errors into one line and an exit code (a traceback only with -v)."""
    try:
        return action()
    except typer.Exit:
        raise
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


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _finish(record: RunRecord) -> None:
    """Say where the run is kept; exit 1 if any agent did not succeed."""
    if record.run_dir:
        print(f"\n💾 Run saved in {record.run_dir}", file=sys.stderr)
    if record.status != "ok":
        raise typer.Exit(1)


QueryArgument = Annotated[str, typer.Argument(help="What you want the agents to do.", show_default=False)]


@app.command("exec")
@with_run_options
def exec_command(
    plan_file: Annotated[Path, typer.Argument(help="A plan: the coordinator's JSON.", show_default=False)],
    query: Annotated[str, typer.Option("--query", help="The user's request the agents work on (default: the plan's description).")] = "",
    *,
    options: RunOptions,
) -> None:
    """Run a plan file."""
    plan = load_plan(plan_file, max_agents=options.max_agents)
    _finish(options.meta_agent().execute(plan, query, run_dir=options.run_dir, record_path=options.record))


@app.command("run")
@with_run_options
def run_command(query: QueryArgument, *, options: RunOptions) -> None:
    """Plan QUERY with the coordinator, show the plan's layers, execute it, print the final answer."""
    _finish(options.meta_agent().run(query, run_dir=options.run_dir, record_path=options.record))


@app.command("plan")
@with_run_options
def plan_command(
    query: QueryArgument,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Save the plan to this file (for `metaagent exec`).")] = None,
    *,
    options: RunOptions,
) -> None:
    """Print the coordinator's plan for QUERY as JSON and its layers; execute nothing."""
    plan = options.meta_agent(stream=sys.stderr).plan(query)
    text = plan.model_dump_json(indent=2, exclude={"depth"})
    for warning in plan.warnings:
        print(warning, file=sys.stderr)
    if output is None:
        print(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")
    for line in layer_lines(plan, plan.get_execution_layers()):
        print(line, file=sys.stderr if output is None else sys.stdout)
    if output is not None:
        print(f"💾 Plan saved to {output}; run it with: metaagent exec {output} --query {shlex.quote(query)}")


def main() -> None:
    app()
