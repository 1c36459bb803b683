"""The command line's end without the interpreter's teardown (qmath/shutdown.py): nothing a finished run still owes
is skipped. The commands' own outputs after such an end (logs, checkpoints, every rank's records) are checked by the
tests that run `python -m qmath` in a process of its own (tests/test_ddp.py, tests/test_embedded.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
import atexit, importlib.util, logging, sys, threading, time
from pathlib import Path
# the module by its path: it imports nothing of qmath's, and the package would take seconds to import
spec = importlib.util.spec_from_file_location("shutdown", sys.argv[2])
shutdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shutdown)

logging.basicConfig(filename="log.txt", level=logging.INFO)
logging.info("logged before the end")  # a file handler's buffer: flushed by logging's atexit handler
atexit.register(lambda: Path("atexit.txt").write_text("ran"))
if sys.argv[1] == "thread":  # a non-daemon thread still writing: the process must wait for it, as CPython would
    threading.Thread(target=lambda: (time.sleep(1.0), Path("thread.txt").write_text("done"))).start()
if sys.argv[1] == "profiled":  # a profiler around qmath (python -m cProfile -m qmath) writes its file afterwards
    sys.setprofile(lambda *_: None)
print("no newline, still printed", end="")
shutdown.exit_without_teardown(3)
sys.setprofile(None)
raise SystemExit(4)  # the ordinary exit, taken only where something is still to run
"""


def run(tmp_path, case: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, case, str(ROOT / "qmath" / "shutdown.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_a_finished_command_runs_its_atexit_handlers_flushes_and_keeps_its_status(tmp_path):
    done = run(tmp_path, "plain")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "no newline, still printed"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "logged before the end" in (tmp_path / "log.txt").read_text()


def test_under_a_profiler_the_ordinary_exit_is_kept(tmp_path):
    done = run(tmp_path, "profiled")
    assert done.returncode == 4, done.stderr
    assert done.stdout == "no newline, still printed"


def test_a_running_non_daemon_thread_gets_the_ordinary_exit(tmp_path):
    done = run(tmp_path, "thread")
    assert done.returncode == 4, done.stderr
    assert (tmp_path / "thread.txt").read_text() == "done"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
