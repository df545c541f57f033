"""hasten's command line, one module per family of commands; `main` is the `hasten` entry point.

Importing a command module registers its commands on `main` (common.py), so every module is imported here.
Bad input ends with one line on stderr naming the problem and the fix, and exit code 2 — never a traceback.
"""
from . import bench, generate, measure, models, serve, train  # noqa: F401  (registers the commands)
from .common import main


__all__ = ["main"]
