"""A user's mistake, said in one line: ``qmath: error: <message>`` on stderr, exit status 2, no traceback.

Every error qmath raises for something the user can fix (bad data, an impossible option, a model or checkpoint that
cannot be read, a reward that raises, a loss that stays non-finite) is a :class:`QMathError`; its message names the
problem and the fix. Anything else is a bug in qmath (or a library) and keeps its traceback. ``QMATH_DEBUG=1``
shows the traceback for every error.

Under DDP, an error that every rank meets alike (the same data file, the same options) is reported by rank 0 alone;
one that is a rank's own (its rewards) by that rank. Either way the job ends: Lightning stops the other ranks when
one of them exits, and :class:`qmath.callbacks.EndAllRanksOnException` when rank 0 does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

EXIT_STATUS = 2  # what argparse and jsonargparse exit with on a usage error


class QMathError(Exception):
    """Something the user can fix; the message says what and how."""

    every_rank = True  # met alike by every rank under DDP (shared inputs), so rank 0 alone reports it


class ConfigError(QMathError, ValueError):
    """An option value that cannot work, or a config file that does not exist."""


class ModelError(QMathError, FileNotFoundError):
    """A model that cannot be found, fetched or trained."""


class CheckpointError(QMathError, ValueError):
    """A checkpoint that cannot be read, or that belongs to another base model."""


def debugging() -> bool:
    return os.environ.get("QMATH_DEBUG", "").lower() not in ("", "0", "false", "no")


def _rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Print a :class:`QMathError` as ``qmath: error: …`` and exit with status 2; let everything else through."""
    try:
        yield
    except QMathError as error:
        if debugging():
            raise
        if error.every_rank and _rank() > 0:
            # rank 0 says it; wait a moment first, as Lightning's launcher kills rank 0 when it sees another rank
            # exit, which could be before rank 0 has printed (rank 0 kills this one once it has)
            time.sleep(3)
            raise SystemExit(EXIT_STATUS) from None
        prefix = f"qmath: error (rank {_rank()}): " if not error.every_rank and _rank() > 0 else "qmath: error: "
        print(prefix + str(error), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS) from None
    except RuntimeError as error:  # torch's OutOfMemoryError is one: a rank's own, said in one line
        if debugging() or type(error).__name__ != "OutOfMemoryError":
            raise
        from qmath.memory import describe_oom

        prefix = f"qmath: error (rank {_rank()}): " if _rank() > 0 else "qmath: error: "
        print(prefix + describe_oom(error), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS) from None
