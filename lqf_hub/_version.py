"""The installed version of lqf-hub (written into every checkpoint)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lqf-hub")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
