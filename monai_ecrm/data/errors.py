"""One error type for bad input files, whose message names every bad file and its problem."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DataError", "format_problems"]


def format_problems(problems: Sequence[tuple[str, str]], header: str | None = None) -> str:
    """Format ``(path, problem)`` pairs as one message, a line per file.

    Args:
        problems: pairs of a file (or folder) path and what is wrong with it.
        header: first line of the message; a count of the bad files when not given.
    """
    if len(problems) == 1 and header is None:
        path, problem = problems[0]
        return f"{path}: {problem}"
    header = header or f"{len(problems)} bad input files"
    return "\n".join([f"{header}:"] + [f"  {path}: {problem}" for path, problem in problems])


class DataError(ValueError):
    """A bad input file (or several): the message names each file and what is wrong with it.

    Raised by the readers, the loader transforms and the datalist builders. ``problems`` holds the
    ``(path, problem)`` pairs, so a batch job can report them one by one.

    Args:
        problems: ``(path, problem)`` pairs, or an already formatted message (what PyTorch's DataLoader passes when it
            re-raises an error from a worker process).
        header: first line of the message when there are several problems.
    """

    def __init__(self, problems: str | Sequence[tuple[str, str]], header: str | None = None) -> None:
        if isinstance(problems, str):
            self.problems: list[tuple[str, str]] = []
            super().__init__(problems)
            return
        self.problems = [(str(path), str(problem)) for path, problem in problems]
        super().__init__(format_problems(self.problems, header))

    def __reduce__(self):
        # The default reduction calls DataError(message); keep the structured problems through pickling.
        return (_rebuild_data_error, (self.problems, str(self)))


def _rebuild_data_error(problems: list[tuple[str, str]], message: str) -> DataError:
    error = DataError(message)
    error.problems = list(problems)
    return error
