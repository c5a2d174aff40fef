"""The `metaagent` command (and `python -m metaagent_ray`).

Loading the CLI loads Ray, which takes a second or more: a Ctrl-C meanwhile ends the command
with the same line and exit code as one a moment later, never a traceback from inside an import.
"""

from __future__ import annotations

from .interrupts import exit_while_loading


def main() -> None:
    exit_while_loading()  # until the command's own code runs (cli.with_options)
    from .cli import main as command_line

    command_line()


if __name__ == "__main__":
    main()
