"""Command-line conventions shared by every ``gmner`` command, whatever its layer.

One rule for flags that take several paths (``--images``): the flag may be repeated, and each
value may hold several paths separated by commas; every path given is kept, in order. This
module knows nothing about what the paths hold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["PathList", "add_path_list"]


class PathList(argparse.Action):
    """Appends every comma-separated path of each use of the flag to one list."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        paths = list(getattr(namespace, self.dest, None) or [])
        for value in values if isinstance(values, list) else [values]:
            parts = [p.strip() for p in str(value).split(",")]
            if not all(parts):
                parser.error(f"{option_string}: empty path in {value!r}")
            paths += [Path(p) for p in parts]
        setattr(namespace, self.dest, paths)


def add_path_list(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    *,
    help: str,
    required: bool = False,
    metavar: str = "DIR",
) -> None:
    """Add ``flag`` as a path list: repeatable, commas accepted (``--images a --images b,c``)."""
    parser.add_argument(
        flag,
        action=PathList,
        default=[],
        required=required,
        metavar=metavar,
        help=f"{help} (repeat the flag or separate with commas)",
    )
