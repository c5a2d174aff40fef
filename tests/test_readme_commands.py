"""Every command the README shows runs as written, or at least parses as a valid invocation.

The convention: every line of a ```bash block in README.md is a command (a trailing backslash joins
the next line; `#` starts a comment; leading VAR=value words set the environment). Each is:

- exempt: the install command and `python -m pytest` (CI runs exactly those), and commands of
  outside tools (`ollama ...`);
- `metaagent ...`: parsed by the CLI itself (an unknown command, option or value fails), then run
  in README order in one working directory, with the fake backend in place of a real model
  (`--llm fake` added, or replacing the named backend). Commands that need a Ray cluster or GPU
  replicas (`submit`, `--address`, `--serve-llm`) are only parsed;
- `python SCRIPT [ARGS]`: run as `python` would, in this process (which shares the session's Ray);
- anything else fails: the README must not show a command this test cannot check.

Inline code that names a command (`metaagent viz RUN_DIR`) or an option (`--slots N`) is checked
too: the command and every option must exist. Every ```python block runs as written.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from metaagent_ray.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXEMPT = {
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[local,dev]"',  # CI's install
    "python -m pytest",  # CI's test command
}
OUTSIDE_TOOLS = {"ollama"}
NEEDS_CLUSTER_OR_GPU = {"submit", "--address", "--serve-llm"}
REAL_BACKENDS = {"auto", "local", "ollama", "openai"}
FENCE = re.compile(r"^[ \t]*```(\w*)[ \t]*$")
ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
INLINE_CODE = re.compile(r"`([^`\n]+)`")

CLI = get_command(app)
COMMANDS = CLI.commands  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Command:
    """One README command line: its environment words and its arguments."""

    line: str
    env: dict[str, str]
    argv: list[str]

    @property
    def program(self) -> str:
        return self.argv[0] if self.argv else ""


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, indented ones (in list items) included."""
    blocks: list[tuple[str, str]] = []
    language: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and language is None:
            language, body = fence.group(1), []
        elif fence:
            blocks.append((language, "\n".join(body)))
            language = None
        elif language is not None:
            body.append(line)
    assert language is None, "README.md: a code block is never closed"
    return blocks


def readme_commands() -> list[Command]:
    """Every command line of the README's ```bash blocks, in order."""
    commands = []
    for language, body in fenced_blocks(README.read_text(encoding="utf-8")):
        if language != "bash":
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            env = {}
            while words and ENV_WORD.match(words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            commands.append(Command(line.split(" #")[0].strip(), env, words))
    return commands


COMMAND_LINES = readme_commands()


def options_of(command: Any) -> set[str]:
    """Every option name a click command takes (`--stream-plan` and `--no-stream-plan` both)."""
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


ALL_OPTIONS = set().union(options_of(CLI), *(options_of(command) for command in COMMANDS.values()))


def parse(argv: list[str]) -> None:
    """Parse a `metaagent` invocation as the CLI would, without running it: a bad command, option
    or value raises the CLI's own usage error."""
    assert argv and argv[0] in COMMANDS, f"`metaagent {' '.join(argv)}`: no command {argv[:1]} (commands: {', '.join(COMMANDS)})"
    COMMANDS[argv[0]].make_context(argv[0], list(argv[1:]))


def with_fake_backend(argv: list[str]) -> list[str]:
    """The same command on the fake backend: its `--llm X` becomes `--llm fake`, or `--llm fake` is added."""
    if "--llm" not in options_of(COMMANDS[argv[0]]):
        return argv
    if "--llm" in argv:
        at = argv.index("--llm") + 1
        assert argv[at] in REAL_BACKENDS | {"fake"}, f"--llm {argv[at]}: the test knows no such backend to replace"
        return [*argv[:at], "fake", *argv[at + 1 :]]
    return [*argv, "--llm", "fake"]


def test_readme_shows_commands_and_only_ones_this_test_checks():
    programs = {command.program for command in COMMAND_LINES}
    assert "metaagent" in programs and "python" in programs
    unknown = [
        command.line
        for command in COMMAND_LINES
        if command.line not in EXEMPT and command.program not in {"metaagent", "python", *OUTSIDE_TOOLS}
    ]
    assert not unknown, f"README commands this test cannot check (use a metaagent or python command): {unknown}"
    assert all(line in [command.line for command in COMMAND_LINES] for line in EXEMPT), (
        "CI's install and test commands must stay in the README"
    )


@pytest.mark.parametrize(
    "command", [command for command in COMMAND_LINES if command.program == "metaagent"], ids=lambda command: command.line[:60]
)
def test_every_metaagent_command_in_the_readme_parses(command: Command):
    argv = command.argv[1:]
    if argv and argv[0].startswith("-"):  # an option of `metaagent` itself, e.g. --version: it runs below
        assert set(argv) <= options_of(CLI), f"`{command.line}`: `metaagent` has no option {sorted(set(argv) - options_of(CLI))}"
        return
    parse(argv)


@pytest.mark.usefixtures("ray_session")
def test_readme_commands_run_in_order_on_the_fake_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The README's commands as a reader types them, one after another in one directory; every
    failing command is reported, not only the first."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    ran, failures = [], []
    for command in COMMAND_LINES:
        if command.line in EXEMPT or command.program in OUTSIDE_TOOLS:
            continue
        argv = command.argv[1:]
        if command.program == "metaagent" and NEEDS_CLUSTER_OR_GPU & set(argv):
            continue  # parsed by the test above; running it needs a cluster or GPU servers
        with monkeypatch.context() as scoped:
            for key, value in command.env.items():
                scoped.setenv(key, value)
            try:
                if command.program == "python":
                    run_python(argv, scoped)
                else:
                    run_metaagent(command, argv)
            except AssertionError as failure:
                failures.append(str(failure))
        ran.append(command.line)
    assert ran, "the README shows no command that runs"
    assert not failures, "\n\n".join(failures)


def run_metaagent(command: Command, argv: list[str]) -> None:
    if argv and argv[0].startswith("-"):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, f"`{command.line}` exited {result.exit_code}:\n{result.output}"
        if argv == ["--version"]:
            assert re.fullmatch(r"metaagent-ray \S+\n", result.output), f"`{command.line}` printed {result.output!r}"
        return
    faked = with_fake_backend(argv)
    result = CliRunner().invoke(app, faked)
    assert result.exit_code == 0, f"`metaagent {shlex.join(faked)}` (README: `{command.line}`) exited {result.exit_code}:\n{result.output}"
    if argv[0] in ("run", "exec", "resume"):
        assert re.search(r"🏁 (\d+)/\1 agents ok", result.output), result.output


def run_python(argv: list[str], scoped: pytest.MonkeyPatch) -> None:
    """`python SCRIPT ARGS` as python runs it; the script's Ray calls find the session's Ray."""
    assert argv and not argv[0].startswith("-"), f"`python {shlex.join(argv)}`: only `python SCRIPT [ARGS]` is checked"
    script = Path(argv[0])
    assert script.is_file(), f"`python {shlex.join(argv)}`: no file {script}"
    scoped.setattr(sys, "argv", [str(script), *argv[1:]])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit:
        assert exit.code in (0, None), f"`python {shlex.join(argv)}` exited {exit.code}"


@pytest.mark.usefixtures("ray_session")
def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocks = [body for language, body in fenced_blocks(README.read_text(encoding="utf-8")) if language == "python"]
    assert blocks, "the README shows the Python API"
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    for body in blocks:
        assert 'llm="fake"' in body, "a README Python block runs in the tests: it must use the fake backend"
        exec(compile(body, "README.md (python block)", "exec"), {"__name__": "readme"})


def inline_code() -> list[str]:
    """Inline code spans outside fenced blocks."""
    spans, fenced = [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            spans += INLINE_CODE.findall(line)
    return spans


def option_words(span: str) -> list[str]:
    """The options a span names: `--plan`, `-o`, `[--open]`, `continue|stop` after them dropped."""
    words = re.split(r"\\?\||\s+", span)
    return [word.strip("[]") for word in words if re.fullmatch(r"\[?--?[a-z][a-z0-9-]*\]?", word)]


def test_every_command_and_option_the_readme_names_exists():
    spans = inline_code()
    named = [span for span in spans if span.startswith("metaagent ")]
    assert named, "the README's commands table names metaagent commands"
    for span in named:
        words = span.split()
        if words[1].startswith("-"):
            missing = set(option_words(span)) - options_of(CLI)
            assert not missing, f"`{span}`: `metaagent` has no option {sorted(missing)}"
            continue
        assert words[1] in COMMANDS or words[1] == "COMMAND", f"`{span}`: no command {words[1]!r} (commands: {', '.join(COMMANDS)})"
        if words[1] in COMMANDS:
            missing = set(option_words(span)) - options_of(COMMANDS[words[1]])
            assert not missing, f"`{span}`: `metaagent {words[1]}` has no option {sorted(missing)}"
    options = [span for span in spans if span.startswith("-")]
    missing = {word for span in options for word in option_words(span.split()[0])} - ALL_OPTIONS
    assert not missing, f"the README names options no metaagent command has: {sorted(missing)}"
