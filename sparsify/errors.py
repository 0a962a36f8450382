"""The one exception type that means "the user can fix this"; the CLI prints it as one line."""

from __future__ import annotations

MAX_MESSAGE = 600  # characters of an error line; longer ones are cut (--debug shows everything)


class SparsifyError(Exception):
    """A problem with the user's input (model, recipe, data, flags), with the fix in the message."""


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` on one line (runs of whitespace, newlines included, become one space), at most ``limit`` characters."""
    text = " ".join(str(message).split())
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40].rstrip()} … ({len(text) - limit + 40} more characters)"


def shorten(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for echoing user input inside a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " …" + text[-2:]
