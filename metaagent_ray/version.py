"""The installed distribution's version: the one source for `metaagent --version` and the run record."""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "metaagent-ray"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
