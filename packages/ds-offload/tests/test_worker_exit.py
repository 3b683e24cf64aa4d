"""The update thread at interpreter exit: a script that ends while a step's CPU update is still
running gets that update finished, and exits normally."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from ds_offload._worker import UpdateJob, UpdateWorker

    out = sys.argv[1]

    def body():
        time.sleep(0.5)  # the main thread has reached the end of the script by now
        with open(out, "w") as f:
            f.write("updated")

    worker = UpdateWorker("test-exit")
    worker.submit(UpdateJob([0]), body)
    {tail}
    """
)


def _run(tmp_path: Path, tail: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "done.txt"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tail=tail), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, out


def test_queued_job_finishes_before_exit(tmp_path: Path) -> None:
    proc, out = _run(tmp_path, "")
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "updated"


def test_abandoned_worker_still_finishes_its_job(tmp_path: Path) -> None:
    # the owner dropped without close(): the hook holds the worker weakly, so it only runs if
    # something else keeps the worker alive; the stop() path lets the queued job finish
    proc, out = _run(tmp_path, "worker.stop()")
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "updated"


def test_exit_hook_does_not_keep_a_closed_worker_alive(tmp_path: Path) -> None:
    tail = (
        "import gc, weakref; worker.close(); ref = weakref.ref(worker); del worker; gc.collect(); "
        "assert ref() is None"
    )
    proc, out = _run(tmp_path, tail)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "updated"
