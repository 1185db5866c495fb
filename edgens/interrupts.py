"""Ctrl-C that always stops a command (standard library only).

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be, and when that is inside a
finalizer (a weakref callback, a ``__del__``; torch runs many) the exception is printed as "Exception ignored in
..." and dropped: the command carried on and exited 0. While :func:`sticky_interrupts` is active, the interrupt is
also remembered, and long work calls :func:`raise_if_interrupted` at safe points (every training batch, every
exported stack, before a bundle or a run's summary is committed), so a dropped interrupt is raised again there;
and Python's "Exception ignored" report of it is not printed, so that Ctrl-C ends with the command's one line.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

_interrupted = threading.Event()


def _handler(signum: int, frame: FrameType | None) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


@contextmanager
def sticky_interrupts() -> Iterator[None]:
    """Remember Ctrl-C for :func:`raise_if_interrupted` during the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_interrupts(previous_hook)
    _interrupted.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        _interrupted.clear()


def _quiet_interrupts(hook: Callable[[Any], object]) -> Callable[[Any], object]:
    """An unraisable-exception hook that drops a KeyboardInterrupt raised in a finalizer (it is remembered and
    raised again at the next safe point, and the command then prints one line) and passes anything else on."""
    def quiet(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _interrupted.set()
            return
        hook(unraisable)

    return quiet


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came during :func:`sticky_interrupts` (even if it was swallowed)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
