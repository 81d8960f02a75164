"""How every command fails on bad input: exit status 2 and one line naming the input and the problem, no traceback
(as ``accord train`` does on a bad config). Errors in accord's own code still raise with their traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from accord.config import ConfigError


class InputError(ValueError):
    """A bad input the user can fix; the message names the file, sample or option at fault."""


BAD_INPUT: tuple[type[BaseException], ...] = (
    InputError,
    ConfigError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    UnicodeDecodeError,
)


def describe(error: BaseException) -> str:
    """One line: ``path: reason`` for OS errors, the message otherwise."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    text = " ".join(str(error).split())
    return text or type(error).__name__


def command(prog: str, also: tuple[type[BaseException], ...] = ()) -> Callable:
    """Decorate a ``main(argv) -> int``: bad input (``BAD_INPUT`` + ``also``) prints ``PROG: error: ...`` and
    returns 2."""

    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except BAD_INPUT + also as e:
                print(f"{prog}: error: {describe(e)}", file=sys.stderr)
                return 2

        return run

    return wrap
