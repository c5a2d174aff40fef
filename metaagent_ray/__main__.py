"""`python -m metaagent_ray` is the `metaagent` command."""

from .cli import main

main()
