"""Running a package README's example as a real script, so the example cannot go stale.

A README marks the code block(s) that form its example with an HTML comment on the line right
before the opening fence (invisible once rendered)::

    <!-- readme-example nproc=2 -->
    ```python
    ...
    ```

Several marked blocks are concatenated in order (prose may sit between them); ``nproc`` (default
1) says how many ranks run it: one is ``python script.py``, more is ``python -m
torch.distributed.run --standalone --nproc_per_node N script.py``. The script runs on the CPU
(``DS_ACCELERATOR=cpu``, no visible GPU, so gloo), in a fresh temporary directory, in its own
session so that a timeout kills every rank it started.

Distributed examples print one line per rank, ``rank R: <text>``; :meth:`ExampleRun.rank_lines`
collects them and :meth:`ExampleRun.assert_ranks_agree` checks every rank printed the same.
Under torchrun each rank's output goes to its own file (``--redirects 3``, also echoed to the
console with a ``[default<R>]:`` prefix by ``--tee 3``), so lines of different ranks are never
interleaved mid-line when they are read back.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MARKER = re.compile(r"^<!--\s*readme-example(?P<args>[^>]*?)\s*-->\s*$")
_FENCE_OPEN = re.compile(r"^```python\s*$")
_RANK_LINE = re.compile(r"^rank (?P<rank>\d+): (?P<text>.*)$")
#: variables of an enclosing launcher that must not reach the example's own launch
_LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


class ReadmeExampleError(AssertionError):
    """The README has no marked example, or the example failed; the message says which."""


@dataclass(frozen=True)
class ReadmeExample:
    """The marked example of one README: its source and how many ranks run it."""

    readme: Path
    source: str
    nproc: int


@dataclass(frozen=True)
class ExampleRun:
    """What a finished example printed."""

    example: ReadmeExample
    stdout: str
    stderr: str
    #: each rank's own stdout (multi-rank examples; empty for one process)
    rank_stdout: dict[int, str] = field(default_factory=dict)

    def rank_lines(self) -> dict[int, list[str]]:
        """The ``rank R: text`` lines, per rank, in the order each rank printed (read from each
        rank's own output when the example ran under torchrun, else from stdout)."""
        texts = list(self.rank_stdout.values()) if self.rank_stdout else [self.stdout]
        out: dict[int, list[str]] = {}
        for text in texts:
            for line in text.splitlines():
                m = _RANK_LINE.match(line.strip())
                if m:
                    out.setdefault(int(m["rank"]), []).append(m["text"])
        return out

    def assert_ranks_agree(self) -> list[str]:
        """Every rank printed at least one ``rank R:`` line and all printed the same ones;
        returns rank 0's lines."""
        lines = self.rank_lines()
        expected = set(range(self.example.nproc))
        if set(lines) != expected:
            raise ReadmeExampleError(
                f"{self.example.readme}: expected `rank R: ...` lines from ranks "
                f"{sorted(expected)}, got them from {sorted(lines)}\nstdout:\n{self.stdout}"
            )
        for rank, got in lines.items():
            if got != lines[0]:
                raise ReadmeExampleError(
                    f"{self.example.readme}: rank {rank} printed {got} but rank 0 printed "
                    f"{lines[0]}: the ranks disagree"
                )
        return lines[0]


def _parse_args(args: str, where: str) -> int:
    nproc = 1
    for item in args.split():
        key, sep, value = item.partition("=")
        if key != "nproc" or not sep or not value.isdigit() or int(value) < 1:
            raise ReadmeExampleError(
                f"{where}: unknown readme-example argument {item!r}; the only one is nproc=N "
                f"(N >= 1)"
            )
        nproc = int(value)
    return nproc


def extract_readme_example(readme: str | os.PathLike[str]) -> ReadmeExample:
    """The marked example of ``readme`` (see the module docstring for the marker)."""
    path = Path(readme)
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[str] = []
    nprocs: set[int] = set()
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if not m:
            i += 1
            continue
        where = f"{path}:{i + 1}"
        if i + 1 >= len(lines) or not _FENCE_OPEN.match(lines[i + 1].strip()):
            raise ReadmeExampleError(f"{where}: a readme-example marker must precede ```python")
        nprocs.add(_parse_args(m["args"], where))
        end = i + 2
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ReadmeExampleError(f"{where}: the ```python block is never closed")
        blocks.append("\n".join(lines[i + 2 : end]))
        i = end + 1
    if not blocks:
        raise ReadmeExampleError(
            f"{path}: no example marked; put `<!-- readme-example -->` (or `<!-- readme-example "
            f"nproc=2 -->` for a multi-rank example) on the line before its ```python block"
        )
    if len(nprocs) > 1:
        raise ReadmeExampleError(
            f"{path}: the marked blocks disagree on nproc ({sorted(nprocs)}); give them one"
        )
    return ReadmeExample(path, "\n\n".join(blocks) + "\n", nprocs.pop())


def _example_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    # The example is a CPU script wherever the tests run (gloo), like a user's first try.
    env["DS_ACCELERATOR"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")
    # The tests' PYTHONPATH entries may be relative to the checkout; the example runs elsewhere.
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p
        )
    env.update(extra or {})
    return env


def run_readme_example(
    readme: str | os.PathLike[str],
    *,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> ExampleRun:
    """Extract ``readme``'s marked example, run it (under torchrun when ``nproc`` > 1) and
    return what it printed; a non-zero exit or a timeout raises :class:`ReadmeExampleError`
    with the script's output.

    ``env``: extra environment variables for the example (on top of this process's).
    """
    example = extract_readme_example(readme)
    with tempfile.TemporaryDirectory(prefix="readme_example_") as tmp:
        script = Path(tmp) / "example.py"
        script.write_text(example.source, encoding="utf-8")
        if example.nproc == 1:
            argv = [sys.executable, str(script)]
        else:
            argv = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(example.nproc),
                "--log-dir",
                str(Path(tmp) / "logs"),
                "--redirects",
                "3",
                "--tee",
                "3",
                str(script),
            ]
        proc = subprocess.Popen(
            argv,
            cwd=tmp,
            env=_example_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a timeout kills every rank
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise ReadmeExampleError(
                f"{example.readme}: the example did not finish in {timeout:g} s\n"
                f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}"
            ) from None
        finally:
            if proc.poll() is None:  # pragma: no cover - only when communicate itself failed
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        rank_stdout = _rank_outputs(Path(tmp) / "logs")
    if proc.returncode != 0:
        raise ReadmeExampleError(
            f"{example.readme}: the example exited with {proc.returncode}\n"
            f"--- script ---\n{example.source}\n--- stdout ---\n{stdout[-4000:]}\n"
            f"--- stderr ---\n{stderr[-6000:]}"
        )
    return ExampleRun(example, stdout, stderr, rank_stdout)


def _rank_outputs(log_dir: Path) -> dict[int, str]:
    """torchrun's per-rank stdout files: ``<log_dir>/<run id>/attempt_<n>/<rank>/stdout.log``
    (one node, so the local rank is the rank); the last attempt wins."""
    out: dict[int, str] = {}
    for path in sorted(log_dir.glob("*/attempt_*/*/stdout.log")):
        if path.parent.name.isdigit():
            out[int(path.parent.name)] = path.read_text(encoding="utf-8", errors="replace")
    return out
