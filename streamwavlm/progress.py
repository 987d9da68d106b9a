"""Progress bars for the long jobs (``run``, ``fidelity``, ``embed``, downloads): rich on a terminal,
silent otherwise.

One helper so that every command behaves the same way: a bar on stderr when stderr is a terminal, and no
output at all when it goes to a file, a pipe or CI, where a redrawn bar is only noise. Results go to
stdout, so a bar never mixes with what a script parses.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import IO, Any, ClassVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Bar:
    """One progress bar: ``advance(n)`` or ``update(done)``; a no-op when its stream is not a terminal.

    ``unit="B"`` shows bytes and a transfer rate; anything else shows ``done/total``. ``total=None`` for an
    unknown length. ``show`` overrides the terminal test. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, description: str, total: float | None, *, unit: str = "", done: float = 0,
                 stream: IO[str] | None = None, show: bool | None = None) -> None:
        self._progress: Progress | None = None
        stream = sys.stderr if stream is None else stream
        if not (is_terminal(stream) if show is None else show):
            return
        counter: ProgressColumn = (DownloadColumn() if unit == "B" else MofNCompleteColumn())
        extra: list[ProgressColumn] = [TransferSpeedColumn()] if unit == "B" else []
        label = f"{{task.description}}{f' ({unit})' if unit not in ('', 'B') else ''}"
        self._progress = Progress(TextColumn(label), BarColumn(), counter, *extra, TimeRemainingColumn(),
                                  console=Console(file=stream, force_terminal=show), transient=True)
        self._task = self._progress.add_task(description, total=total, completed=done)
        self._progress.start()

    @property
    def active(self) -> bool:
        """Whether a bar is shown."""
        return self._progress is not None

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, done: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class HubBar(Bar):
    """:class:`Bar` in the shape huggingface_hub expects of a ``tqdm_class`` (``update(n)`` adds, context
    manager), so that Hub downloads show the same bars as everything else."""

    show: ClassVar[bool | None] = None

    def __init__(self, *_args: Any, desc: str = "", total: float | None = None, initial: float = 0,
                 unit: str = "B", **_kwargs: Any) -> None:
        super().__init__(desc, total, unit=unit, done=initial, show=self.show)
        self.n, self.total = initial, total

    def update(self, n: float | None = 1) -> None:  # type: ignore[override]  # tqdm semantics: n is an increment
        self.n += n or 0
        self.advance(n or 0)

    def __enter__(self) -> HubBar:
        return self


class QuietHubBar(HubBar):
    """:class:`HubBar` that never shows (``progress=False``)."""

    show = False
