"""The command line's one type for a path it is given (click.Path, "" refused)."""

from __future__ import annotations

from typing import Any

import click


class GivenPath(click.Path):
    """click.Path that refuses an empty argument: as a Path, "" is ".", so an unset variable
    in `splitvmm up "$CONFIG"`, `snapshot verify "$DIR"` or `--cache-dir "$DIR"` named the
    current directory without a word (a config "that is a directory", a snapshot whose
    manifest is missing, a kit built where the shell stood). A usage error, exit 2."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "":
            self.fail("an empty path", param, ctx)
        return super().convert(value, param, ctx)
