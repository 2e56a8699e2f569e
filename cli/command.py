"""What a `tia2` command is (`Command`), the parser of the command line and of each command, and
what the commands' arguments share: their argument types and the store they work on."""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import dataclass
from typing import Callable

from tia2.errors import UserError
from tia2.store import default_store_root


@dataclass(frozen=True)
class Command:
    """A `tia2` command: its name, its line in `tia2 --help`, the description of its own help, the
    function that adds its arguments to its parser and the one that runs it (giving the exit
    code)."""
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class CommandLineError(Exception):
    """A mistake in the command line found by argparse; its text names the command."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, like a UserError (argparse would print the usage before it and exit).
        raise CommandLineError(f"{self.prog}: error: {message}")


class CommandParser(Parser):
    """The parser of one command. Its arguments are added when it first parses: they take their
    choices and defaults from the stages, and importing a stage can take seconds (torch), which
    a command that does not run it should not wait for."""

    def __init__(self, *args, command: Command, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = command
        self.set_defaults(func=command.run)
        self._arguments_added = False

    def parse_known_args(self, args=None, namespace=None):
        if not self._arguments_added:
            self.command.add_arguments(self)
            self._arguments_added = True
        return super().parse_known_args(args, namespace)


def open_store(args, create: bool = True, write: bool = True):
    """The store of --store or $TIA2_STORE; for a command that writes to it, checked to be writable
    before any work."""
    from tia2.store import Store

    store = Store(args.store or default_store_root(), create=create)
    if write:
        store.check_writable()
    return store


def defaults_of(stage: Callable) -> dict:
    """The default of each parameter of a stage function that has one: an option's default where
    it sets that parameter."""
    return {name: p.default for name, p in inspect.signature(stage).parameters.items()
            if p.default is not inspect.Parameter.empty}


def as_written(value: float, scientific: bool = False) -> str:
    """A number as help texts write it: 7.5, 0.001, 1e-6 (not 1e-06); `scientific`: 1e-3, 2.5e-4."""
    mantissa, e, exponent = (f"{value:e}" if scientific else f"{value:g}").partition("e")
    if scientific:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return mantissa + (f"e{int(exponent)}" if e else "")


# --- argument types ---------------------------------------------------------------------------
def number(kind: type, minimum: float | None = None, *, above: float | None = None,
           maximum: float | None = None, word: str | None = None, meaning=None):
    """An argparse type: a finite number of `kind` (int or float), at least `minimum` or more than
    `above`, and at most `maximum`, when given, or the keyword `word` (which stands for `meaning`)."""
    expected = "a whole number" if kind is int else "a finite number"
    if minimum is not None:
        expected += f" of at least {minimum:g}"
    if above is not None:
        expected += f" above {above:g}"
    if maximum is not None:
        expected += f" and at most {maximum:g}"
    if word is not None:
        expected += f" or {word}"

    def parse(text: str):
        if word is not None and text == word:
            return meaning
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (minimum is None or value >= minimum) and (above is None or value > above)
                and (maximum is None or value <= maximum)):
            raise argparse.ArgumentTypeError(f"must be {expected} (got {text!r})")
        return value
    return parse


count = number(int, minimum=1)  # sizes, steps, limits: zero or fewer would do nothing
port = number(int, minimum=1, maximum=65535)  # a TCP port
finite = number(float)
count_or_auto = number(int, minimum=1, word="auto", meaning=None)  # auto (None): from the GPU's free memory


def number_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated finite numbers, at least one."""
    try:
        values = tuple(finite(x) for x in text.split(",") if x.strip())
    except argparse.ArgumentTypeError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"must be comma-separated finite numbers (got {text!r})")
    return values


def device(name: str) -> str:
    """An argparse type: a torch device this machine has (tia2.devices)."""
    from tia2.devices import resolve_device

    try:
        return resolve_device(name)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def set_name(text: str) -> str:
    """An argparse type: the name of a set to create."""
    if not text or text != text.strip():
        raise argparse.ArgumentTypeError(f"a set name must be non-empty, without surrounding spaces (got {text!r})")
    return text
