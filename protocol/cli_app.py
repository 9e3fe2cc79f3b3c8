"""The Typer app every ATOM CLI is built on: positional arguments keep their help text.

Typer before 0.26 sets an argument's ``help`` and then calls click's ``Argument.__init__``,
which since click 8.2 takes ``help`` itself and resets it to None, so ``--help`` listed
positional arguments bare. flwr pins typer below 0.21, so the help is put back here, from the
command function's own ``typer.Argument(help=...)``. Imported by the CLIs only.
"""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.core import TyperCommand
from typer.models import ArgumentInfo
from typer.utils import get_params_from_function

__all__ = ["CliApp"]


class _ArgumentHelpCommand(TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        function = getattr(self.callback, "__wrapped__", None)  # typer's wrapper keeps it
        if function is None:
            return
        declared = get_params_from_function(function)
        for param in self.params:
            meta = declared.get(param.name or "")
            if (isinstance(param, click.Argument) and not getattr(param, "help", None)
                    and meta is not None and isinstance(meta.default, ArgumentInfo)):
                param.help = meta.default.help  # type: ignore[attr-defined]


class CliApp(typer.Typer):
    """``typer.Typer`` whose commands show their positional arguments' help."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None,
                **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _ArgumentHelpCommand, **kwargs)
