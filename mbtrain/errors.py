"""The one exception type that the CLI turns into a single line on stderr."""


class MbtrainError(ValueError):
    """A problem with the user's input (file, column, flag): reported without a traceback. A ValueError, so that
    the Python API (a balancer's settings, say) raises what callers of a library expect."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """A library's error message as one printable, bounded line, to quote inside ours."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
