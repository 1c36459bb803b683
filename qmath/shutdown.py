"""Ending a finished command without the interpreter's teardown.

After a command has returned, CPython's shutdown still tears down each of the ~3,900 modules that torch,
transformers, Lightning and torchmetrics import, and runs the C++ destructors of torch's globals: 2.4-2.7 s of one
core measured on a machine of 2, a quarter of a short CLI run and paid again by every DDP rank, for memory the OS
reclaims anyway.
:func:`exit_without_teardown` skips that part the way the standard library's own forked children end
(``multiprocessing``'s ``_bootstrap`` then ``os._exit``): what a finished run still owes is done first (atexit
handlers: logging's flush, multiprocessing's worker shutdown; the standard streams), and where another Python thread
may still be writing (a non-daemon thread alive), or where something around qmath still has work to do after it
returns (a profiler, ``python -i``, a Jupyter kernel), the process exits the ordinary way.

Only the command line ends this way (``python -m qmath``, the ``qmath`` script); :func:`qmath.__main__.cli`, which
tests and notebooks call, returns as usual.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import sys
import threading


def ends_here() -> bool:
    """Whether this process is qmath's own command, as the shell started it: not under a profiler or tracer
    (``python -m cProfile -m qmath`` writes its profile after qmath returns), not ``python -i``, not a Jupyter
    kernel's ``%run -m qmath``, and with no non-daemon thread left running."""
    return not (sys.flags.interactive or sys.gettrace() or sys.getprofile() or "IPython" in sys.modules
                or pending_threads())


def pending_threads() -> list[threading.Thread]:
    """Threads other than this one that the interpreter's shutdown would wait for."""
    return [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon and t.is_alive()]


def exit_without_teardown(status: int = 0) -> None:
    """End the process with ``status`` once its atexit handlers have run and its streams are flushed; return (and
    let the caller exit as usual) where :func:`ends_here` says no."""
    if not ends_here():
        return
    # atexit's runner is not in the module's documented API, but it is what Py_FinalizeEx itself calls and has been
    # there since Python 2; without it, logging's last records and multiprocessing's cleanup would be skipped
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # closed or detached: nothing left to write
            stream.flush()
    with contextlib.suppress(Exception):  # what C and C++ code printed through stdio, which exit() would flush
        ctypes.CDLL(None).fflush(None)
    os._exit(status)
