"""`metaagent`: a thin command line over the public API: it parses options, calls the API (api.py) and
chooses the view (views.py). Only the stop signals' handling (interrupts.py) is its own besides."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import webbrowser
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional, TextIO, get_type_hints

import typer

from .api import (
    DEFAULT_MAX_AGENTS,
    ConfigError,
    JobLog,
    JobRequest,
    MetaAgent,
    MetaAgentError,
    RunRecord,
    RunSettings,
    RunStopped,
    ServeLLMSpec,
    SlotPlan,
    __version__,
    check_output_file,
    copy_record,
    dashboard_address,
    follow_job,
    job_run_dir,
    load_plan,
    node_slots,
    plan_json,
    print_run_archive,
    save_plan,
    stop_job,
    submit_job,
    write_pictures,
    write_report,
)
from .interrupts import command_started, exit_code
from .views import View, choose_view, is_live, say, say_where_run_is, show_node_resources, show_plan, show_slot_plan, watching

DEFAULTS = {name: RunSettings.default(name) for name in RunSettings.model_fields}  # the help's [default: ...]
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _print_version(wanted: bool) -> None:
    if wanted:
        print(f"metaagent-ray {__version__}")
        raise typer.Exit()


@app.callback()
def _commands(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the installed version and exit.")
    ] = False,
) -> None:
    """Plan a task as a graph of role-based agents and run each agent on Ray as soon as its dependencies finish."""


@dataclass(frozen=True)
class RunOptions:
    """The options every command takes; each field's annotation is its command-line option.

    Unset options are None, so the API's defaults apply and `resume` keeps the stored settings.
    """

    llm: Annotated[
        Optional[str],
        typer.Option(
            "--llm",
            help="LLM backend: auto (Ollama if it serves the model, else local), ollama, local, openai, fake, or any installed backend.",
        ),
    ] = None
    model: Annotated[Optional[str], typer.Option("--model", help="Model name (Ollama) or GGUF file (local).")] = None
    ollama_host: Annotated[Optional[str], typer.Option("--ollama-host", help="Ollama server (default: $OLLAMA_HOST).")] = None
    slots: Annotated[
        Optional[int], typer.Option("--slots", min=1, help="At most this many agents call an LLM at once (a Ray custom resource).")
    ] = None
    address: Annotated[
        Optional[str],
        typer.Option(
            "--address",
            help="The Ray cluster: HEAD:6379 or auto (default $RAY_ADDRESS, else Ray starts embedded); for submit, the dashboard http://HEAD:8265.",
        ),
    ] = None
    record: Annotated[Optional[Path], typer.Option("--record", help="Also write the run record (JSON) to this file.")] = None
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Keep the run's files here (default runs/<UTC time>-<slug>/).")] = (
        None
    )
    retries: Annotated[
        Optional[int],
        typer.Option("--retries", min=0, help=f"Retries of a transient LLM error per agent \\[default: {DEFAULTS['retries']}]."),
    ] = None
    agent_timeout: Annotated[
        Optional[float],
        typer.Option(
            "--agent-timeout", help=f"Seconds one LLM call may take; a hung agent is cancelled \\[default: {DEFAULTS['agent_timeout']:g}]."
        ),
    ] = None
    on_failure: Annotated[
        Optional[str],
        typer.Option(
            "--on-failure",
            help=f"When an agent fails: continue (dependents run without it) or stop (they are skipped) \\[default: {DEFAULTS['on_failure']}].",
        ),
    ] = None
    max_depth: Annotated[
        Optional[int],
        typer.Option("--max-depth", min=0, help=f"How deep agents may delegate to sub-plans \\[default: {DEFAULTS['max_depth']}]."),
    ] = None
    max_agents: Annotated[
        Optional[int], typer.Option("--max-agents", min=1, help=f"Refuse plans with more agents \\[default: {DEFAULTS['max_agents']}].")
    ] = None
    max_total_agents: Annotated[
        Optional[int],
        typer.Option(
            "--max-total-agents",
            min=1,
            help=f"Bound on all agents of a run, sub-plans included \\[default: {DEFAULTS['max_total_agents']}].",
        ),
    ] = None
    replan: Annotated[
        Optional[int],
        typer.Option(
            "--replan",
            min=0,
            max=10,
            help=f"After the agents finish, a joiner reads their results and may plan new agents, up to N times \\[default: {DEFAULTS['replan']}].",
        ),
    ] = None
    max_tokens: Annotated[
        Optional[int],
        typer.Option("--max-tokens", min=1, help="Most tokens one agent's answer may have \\[default: a budget per role and model kind]."),
    ] = None
    openai_base_url: Annotated[
        Optional[str], typer.Option("--openai-base-url", help="--llm openai: the server's /v1 URL (vLLM, llama-server).")
    ] = None
    prompt_style: Annotated[
        Optional[str],
        typer.Option(
            "--prompt-style",
            help="--llm openai: chat, or document for a model without a chat template \\[default: auto, from llama-server's /props].",
        ),
    ] = None
    serve_llm: Annotated[
        Optional[Path],
        typer.Option(
            "--serve-llm",
            help="Serve the model from the Ray Serve replicas this YAML file describes (deployed, or attached to if running); "
            "agents call them through the openai backend. See docs/serve-llm.md.",
        ),
    ] = None
    fake_latency: Annotated[
        Optional[str], typer.Option("--fake-latency", help="Fake backend: seconds per call, or a JSON file of seconds by agent index.")
    ] = None
    fake_fail: Annotated[
        Optional[str], typer.Option("--fake-fail", help="Fake backend: inject faults, e.g. 3, 3:1, 3:hang, coordinator:garbage.")
    ] = None
    fake_plan: Annotated[
        Optional[Path], typer.Option("--fake-plan", help="Fake backend: the coordinator answers with this file's text (a plan's JSON).")
    ] = None
    ray_timeline: Annotated[
        Optional[Path], typer.Option("--ray-timeline", help="Write Ray's own chrome trace of the run (ray.timeline) to this file.")
    ] = None
    otel: Annotated[
        bool,
        typer.Option("--otel", help="Export the run as an OpenTelemetry trace (OTLP/HTTP; on anyway when $OTEL_EXPORTER_OTLP_ENDPOINT is set)."),
    ] = False
    progress: Annotated[str, typer.Option("--progress", help="auto (live view in a terminal, plain lines otherwise), live or plain.")] = (
        "auto"
    )
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging, and tracebacks on errors.")] = False
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print only warnings and the final output.")] = False
    ship_run_dir: Annotated[
        bool,
        typer.Option("--ship-run-dir", hidden=True, help="In a job from `metaagent submit`: print the run directory for it to bring back."),
    ] = False

    def settings(self) -> dict[str, Any]:
        """The API settings these flags give; a flag for another backend is an error."""
        given_fake = (("latency", self.fake_latency), ("fail", self.fake_fail), ("plan", self.fake_plan and str(self.fake_plan)))
        fake = {key: value for key, value in given_fake if value is not None}
        if fake and self.llm != "fake":
            raise ConfigError("--fake-latency, --fake-fail and --fake-plan apply to --llm fake only")
        if self.ollama_host is not None and self.llm not in (None, "ollama", "auto"):
            raise ConfigError("--ollama-host applies to --llm ollama or auto only")
        if (self.openai_base_url is not None or self.prompt_style is not None) and self.llm != "openai":
            raise ConfigError("--openai-base-url and --prompt-style apply to --llm openai only")
        options = {
            **fake,
            **({"host": self.ollama_host} if self.ollama_host is not None else {}),
            **({"base_url": self.openai_base_url} if self.openai_base_url is not None else {}),
            **({"prompt_style": self.prompt_style} if self.prompt_style is not None else {}),
        }
        given = {
            "llm": self.llm,
            "model": self.model,
            "llm_options": options or None,
            "slots": self.slots,
            "address": self.address,
            "retries": self.retries,
            "agent_timeout": self.agent_timeout,
            "on_failure": self.on_failure,
            "max_depth": self.max_depth,
            "max_agents": self.max_agents,
            "max_total_agents": self.max_total_agents,
            "max_tokens": self.max_tokens,
            "otel": self.otel or None,
            "replan": self.replan,
            "serve_llm": ServeLLMSpec.from_yaml(self.serve_llm) if self.serve_llm is not None else None,
        }
        return {key: value for key, value in given.items() if value is not None}

    def view(self, stream: TextIO | None = None) -> View:
        """The live view in a terminal (or with --progress live), else the seed's plain lines on `stream` (default stdout)."""
        return choose_view(self.progress, quiet=self.quiet, stream=stream)

    @contextmanager
    def meta_agent(self, stream: TextIO | None = None, *, stream_plan: bool = True) -> Iterator[MetaAgent]:
        """The API object these options describe, reporting to `stream` (default stdout); the live view ends with it."""
        settings = self.settings()
        view = self.view(stream)
        live = is_live(view)
        with watching(view), MetaAgent(on_event=view, verbose=self.verbose, stream=live, stream_plan=stream_plan, **settings) as agent:
            yield agent


def with_options(options_class: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command every flag of `options_class` (a dataclass); it receives them gathered as `options`."""
    hints = get_type_hints(options_class, include_extras=True)
    names = [field.name for field in fields(options_class)]
    shared = [
        inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=hints[field.name])
        for field in fields(options_class)
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        command_hints = get_type_hints(command, include_extras=True)
        own = [
            parameter.replace(annotation=command_hints[parameter.name])
            for parameter in inspect.signature(command).parameters.values()
            if parameter.name != "options"
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            options = options_class(**{name: kwargs.pop(name) for name in names})
            logging.basicConfig(level=logging.DEBUG if options.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
            return _guarded(options.verbose, lambda: command(options=options, **kwargs))

        wrapper.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
        return wrapper

    return decorate


with_run_options = with_options(RunOptions)


def _guarded(verbose: bool, action: Callable[[], Any]) -> Any:
    """Run `action`, turning errors into one line and an exit code (a traceback only with -v)."""
    command_started()
    try:
        return action()
    except typer.Exit:
        raise
    except MetaAgentError as error:
        if verbose:
            logging.exception("details")
        _fail(str(error), error.exit_code)
    except KeyboardInterrupt as interrupt:
        _fail("interrupted", exit_code(interrupt))
    except Exception as error:  # noqa: BLE001 - the last line of defence against tracebacks
        if verbose:
            raise
        _fail(f"unexpected {type(error).__name__}: {error} (run with -v for details)", 1)


def _fail(message: str, code: int) -> None:
    say(f"error: {message}")
    raise typer.Exit(code)


def _run_and_say_how_it_ended(options: RunOptions, run: Callable[[], RunRecord]) -> None:
    """Run; say where the run is kept and how to resume it; exit 1 if any agent did not succeed.

    In a submitted job (--ship-run-dir) the run directory goes to the job's log, also when interrupted.
    """
    try:
        record = run()
    except RunStopped as stop:
        if options.ship_run_dir and stop.record.run_dir:
            print_run_archive(Path(stop.record.run_dir), sys.stdout)
        raise
    if options.ship_run_dir and record.run_dir:
        print_run_archive(Path(record.run_dir), sys.stdout)
    say_where_run_is(record)
    if record.status != "ok":
        raise typer.Exit(1)


def _job_run_dir(options: RunOptions, slug_source: str) -> Path | None:
    """--run-dir; in a job from `submit`, a directory of its own outside the job's working directory."""
    if options.run_dir is not None or not options.ship_run_dir:
        return options.run_dir
    return job_run_dir(slug_source)


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
    plan = load_plan(plan_file, max_agents=options.max_agents or DEFAULT_MAX_AGENTS)
    run_dir = _job_run_dir(options, query or plan.description)
    with options.meta_agent() as agent:
        _run_and_say_how_it_ended(
            options, lambda: agent.execute(plan, query, run_dir=run_dir, record_path=options.record, ray_timeline=options.ray_timeline)
        )


@app.command("run")
@with_run_options
def run_command(
    query: QueryArgument,
    stream_plan: Annotated[
        bool,
        typer.Option(
            "--stream-plan/--no-stream-plan", help="Start each agent while the coordinator still writes the plan, once it is safe."
        ),
    ] = True,
    *,
    options: RunOptions,
) -> None:
    """Plan QUERY with the coordinator, show the plan's layers, execute it, print the final answer."""
    run_dir = _job_run_dir(options, query)
    with options.meta_agent(stream_plan=stream_plan) as agent:
        _run_and_say_how_it_ended(
            options, lambda: agent.run(query, run_dir=run_dir, record_path=options.record, ray_timeline=options.ray_timeline)
        )


@app.command("plan")
@with_run_options
def plan_command(
    query: QueryArgument,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Save the plan to this file (for `metaagent exec`).")] = None,
    *,
    options: RunOptions,
) -> None:
    """Print the coordinator's plan for QUERY as JSON and its layers; execute nothing."""
    if output is not None:
        check_output_file(output, "-o")
    with options.meta_agent(stream=sys.stderr) as agent:
        plan = agent.plan(query)
    if output is not None:
        save_plan(plan, output)
    show_plan(plan, plan_json(plan), saved_to=output, query=query)


@app.command("resume")
@with_run_options
def resume_command(
    earlier_run: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="The directory of an earlier run.", show_default=False)],
    *,
    options: RunOptions,
) -> None:
    """Re-run what failed, was skipped or never finished in RUN_DIR, and everything downstream; reuse the rest.

    Options given here replace the run's stored ones; injected faults are never carried over.
    """
    if options.run_dir is not None:
        raise ConfigError("resume writes into RUN_DIR itself; --run-dir does not apply")
    settings = options.settings()
    view = options.view()
    with watching(view):
        _run_and_say_how_it_ended(
            options,
            lambda: MetaAgent.resume(
                earlier_run,
                on_event=view,
                verbose=options.verbose,
                stream=is_live(view),
                record_path=options.record,
                ray_timeline=options.ray_timeline,
                **settings,
            ),
        )


# Options that stay on the submitting machine: where the job goes and where its run comes back.
SUBMITTER_OPTIONS = {"address", "run_dir", "record", "ship_run_dir", "ray_timeline", "progress"}


def _job_arguments(options: RunOptions) -> list[str]:
    """The run options given to `submit`, as the job's metaagent command takes them."""
    hints = get_type_hints(RunOptions, include_extras=True)
    arguments: list[str] = []
    for option in fields(RunOptions):
        value = getattr(options, option.name)
        if option.name in SUBMITTER_OPTIONS or value is None or value is False:
            continue
        info = hints[option.name].__metadata__[0]  # typer keeps an Annotated option's first name as its `default`
        flag = max([info.default, *info.param_decls], key=len)
        arguments += [flag] if value is True else [flag, str(value)]
    return arguments


def _key_values(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


@app.command("submit")
@with_run_options
def submit_command(
    query: Annotated[Optional[str], typer.Argument(help="What you want the agents to do (or --plan).", show_default=False)] = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan", help="Run this plan file instead of planning QUERY.")] = None,
    working_dir: Annotated[
        Optional[Path], typer.Option("--working-dir", help="Send this directory to the job (its working directory).")
    ] = None,
    pip: Annotated[Optional[list[str]], typer.Option("--pip", help="Install this package in the job's environment (repeatable).")] = None,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="Set KEY=VALUE in the job's environment (repeatable).")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the job id and return; --attach follows it later.")] = False,
    attach: Annotated[
        Optional[str], typer.Option("--attach", metavar="JOB_ID", help="Follow a submitted job and bring its run back.")
    ] = None,
    *,
    options: RunOptions,
) -> None:
    """Run QUERY (or --plan FILE) on a Ray cluster as a Ray Job: follow its log, then bring its run directory back under runs/.

    Ctrl-C asks whether to stop the job or detach from it.
    """
    if not options.verbose:  # Ray's INFO lines about uploading the working directory and closing the log's socket
        for name in [name for name in logging.root.manager.loggerDict if name.startswith("ray.dashboard")]:
            logging.getLogger(name).setLevel(logging.WARNING)
    address = dashboard_address(options.address)
    if options.run_dir is not None and options.run_dir.exists() and any(options.run_dir.iterdir()):
        raise ConfigError(f"--run-dir {options.run_dir} exists and is not empty; the job's run directory comes back into a new one")
    job_id = attach
    if job_id is None:
        if (query is None) == (plan_file is None):
            raise ConfigError("submit takes a QUERY or --plan FILE (one of them)")
        if plan_file is not None:
            load_plan(plan_file, max_agents=options.max_agents or DEFAULT_MAX_AGENTS)  # a bad plan fails here, not in the job
        command = ["exec", str(plan_file)] if plan_file is not None else ["run", query or ""]
        request = JobRequest(
            address=address,
            command=[*command, *_job_arguments(options)],
            working_dir=working_dir,
            pip=pip or [],
            env_vars=_key_values(env or []),
        )
        job_id = submit_job(request, plan_file=plan_file)
        say(f"🚀 Submitted Ray job {job_id} to {address}")
    elif query is not None or plan_file is not None:
        raise ConfigError("--attach follows a job already submitted; it takes no QUERY or --plan")
    if no_wait:
        print(job_id)
        say(f"Follow it and bring its run back with: metaagent submit --attach {job_id} --address {address}")
        return
    _follow(address, job_id, options)


def _follow(address: str, job_id: str, options: RunOptions) -> None:
    """Follow the job to its end (Ctrl-C: stop it or detach), bring its run directory back, exit as the job did."""
    log = JobLog()
    while True:
        try:
            outcome = follow_job(address, job_id, log, destination=options.run_dir)
            break
        except KeyboardInterrupt:
            if _ask_stop(job_id):
                stop_job(address, job_id)
                say(f"🛑 Stopping job {job_id}; its run saves what finished")
                continue
            say(f"Detached; job {job_id} runs on. Follow it again with: metaagent submit --attach {job_id} --address {address}")
            return
    if outcome.run_dir is not None:
        say(f"💾 Run brought back to {outcome.run_dir}")
        if options.record is not None:
            copy_record(outcome.run_dir, options.record)
    if outcome.exit_code != 0:
        _fail(outcome.failure(), outcome.exit_code)


def _ask_stop(job_id: str) -> bool:
    """Ctrl-C while following: True to stop the job; without a terminal, or on a second Ctrl-C, stop."""
    try:
        answer = input(f"\nStop job {job_id} (s) or detach and leave it running (d)? [s/d] ")
    except (EOFError, KeyboardInterrupt):
        return True
    return not answer.strip().lower().startswith("d")


@dataclass(frozen=True)
class SlotOptions:
    """The flags of `resources` and `node-resources`: which backend's footprint to count."""

    llm: Annotated[str, typer.Option("--llm", help="LLM backend: auto, ollama, local or fake.")] = "auto"
    model: Annotated[Optional[str], typer.Option("--model", help="Model name (Ollama) or GGUF file (local).")] = None
    ollama_host: Annotated[Optional[str], typer.Option("--ollama-host", help="Ollama server (default: $OLLAMA_HOST).")] = None
    fake_model_mb: Annotated[
        Optional[float], typer.Option("--fake-model-mb", min=0, help="Fake backend: pretend each instance holds a model of this many MB.")
    ] = None
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Tracebacks on errors.")] = False

    def slot_plan(self) -> SlotPlan:
        """This node's LLM slots for the backend these flags describe."""
        if self.ollama_host is not None and self.llm not in ("ollama", "auto"):
            raise ConfigError("--ollama-host applies to --llm ollama or auto only")
        if self.fake_model_mb is not None and self.llm != "fake":
            raise ConfigError("--fake-model-mb applies to --llm fake only")
        options = {"host": self.ollama_host} if self.ollama_host is not None else {}
        if self.fake_model_mb is not None:
            options = {"model_mb": self.fake_model_mb}
        return node_slots(self.llm, self.model, options)


@app.command("resources")
@with_options(SlotOptions)
def resources_command(*, options: SlotOptions) -> None:
    """Print this node's LLM slots: RAM, cores, GPUs, the model's footprint, the reasoning and the count."""
    show_slot_plan(options.slot_plan())


@app.command("node-resources")
@with_options(SlotOptions)
def node_resources_command(*, options: SlotOptions) -> None:
    """Print only the JSON for `ray start --resources '<json>'` on this cluster node."""
    show_node_resources(options.slot_plan())


@app.command("viz")
def viz_command(
    earlier_run: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="The directory of a run.", show_default=False)],
) -> None:
    """Draw a run: graph.svg (layers, colours, dependencies), timeline.svg and graph.mmd (Mermaid), in RUN_DIR."""
    for path in _guarded(False, lambda: write_pictures(earlier_run)):
        print(path)


@app.command("report")
def report_command(
    earlier_run: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="The directory of a run.", show_default=False)],
    open_it: Annotated[bool, typer.Option("--open", help="Open the report in the web browser.")] = False,
) -> None:
    """Write RUN_DIR/report.html again: the query, plan, graph, timeline and every agent's output in one page."""
    path = _guarded(False, lambda: write_report(earlier_run))
    print(path)
    if open_it and not webbrowser.open(path.resolve().as_uri()):
        _fail(f"no web browser found to open {path}; open it yourself", 1)


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option("--host", help="Listen on this address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Listen on this port.")] = 8000,
    slots: Annotated[
        Optional[int], typer.Option("--slots", min=1, help="LLM slots all runs share (default: all of the cluster's).", show_default=False)
    ] = None,
    policy: Annotated[
        str, typer.Option("--policy", help="Which waiting agent gets a free slot: short, fifo, path, las or las-path (docs/serve.md).")
    ] = "short",
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where runs are kept, one run directory each.")] = Path("runs"),
    llm: Annotated[str, typer.Option("--llm", help="Backend whose footprint sizes embedded Ray's LLM slots.")] = "auto",
    address: Annotated[
        Optional[str],
        typer.Option("--address", help="Ray cluster address (default: $RAY_ADDRESS, else Ray embedded here).", show_default=False),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks on errors.")] = False,
) -> None:
    """Serve runs over HTTP (POST /v1/runs; GET / lists them): many runs sharing the cluster's LLM slots; Ctrl-C stops."""

    def serve_until_stopped() -> None:
        try:
            from .serve import ServiceOptions, start_service
        except ImportError as error:
            raise ConfigError(f"metaagent serve needs the serve extra: pip install 'metaagent-ray[serve]' ({error.name} is missing)") from None
        options = ServiceOptions(host=host, port=port, slots=slots, policy=policy, runs_dir=runs_dir, llm=llm, address=address)  # type: ignore[arg-type]
        service = start_service(options, on_notice=say)
        say(f"🛎️ metaagent serve: {service.url}/ (runs in {runs_dir}); Ctrl-C stops")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            say("🛑 metaagent serve stopped; its runs are kept in their run directories (resume an interrupted one with metaagent resume RUN_DIR)")
        finally:
            service.stop()

    _guarded(verbose, serve_until_stopped)


def main() -> None:
    """The `metaagent` command. An argument that is not UTF-8 text (the shell passed raw bytes) is refused
    first: Ray, the record and the report all need text (Ray fails to start on such a command line)."""
    for position, argument in enumerate(sys.argv[1:], start=1):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError as error:
            undecoded = argument[error.start]  # Python keeps a byte that is not UTF-8 as a surrogate, U+DC80..U+DCFF
            byte = f"byte 0x{ord(undecoded) - 0xDC00:02x}" if "\udc80" <= undecoded <= "\udcff" else "a lone surrogate"
            print(f"error: argument {position} is not UTF-8 text ({byte} at character {error.start}): give it as UTF-8", file=sys.stderr)
            raise SystemExit(2)
    app()
