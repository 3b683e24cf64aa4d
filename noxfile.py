"""One noxfile for the monorepo: sessions parametrized over the packages.

    nox                       lint, boundaries, isolation, every package's tests, then the summary
    nox -s "tests(package='ds-zero')"   one package's tests
    nox -s demo               the main job: a small GPT on 2 CPU ranks (needs ds-all)
    nox -s bench -- NAME...   CPU benchmarks beside their peers (see CPU_BENCHES)

torch is big (about 30 s to install per environment on 2 cores), so it is installed once into a
base environment and exposed to every package environment through a ``.pth`` file: each package
environment is still fresh and gets only its own package, its declared dependencies and its test
extra installed, but torch 2.13.0 (CPU build) is shared rather than copied once per package.
Likewise each package's wheel is built once into .nox/_wheels (rebuilt when a file of the package
changes) and every environment installs from there with tools/install.py, the README's install
command, instead of rebuilding its siblings from source. Packages are discovered under packages/
(tools/_packages.py): a new package needs no edit here.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox
import nox.command

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
import _packages as pk  # noqa: E402  (the packages as data: discovered, never listed here)

PKGS = pk.discover()
PACKAGES = list(PKGS)  # folder names under packages/, sorted
TORCH = "torch==2.13.0"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
BASE_ENV = ROOT / ".nox" / "_torch_base"
BUILD_ENV = ROOT / ".nox" / "_build"
WHEELS = ROOT / ".nox" / "_wheels"
REPORTS = ROOT / ".nox" / "_reports"
TOOLS = ROOT / "tools"

nox.options.sessions = ["lint", "boundaries", "isolation", "tests", "summary"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True


def _needs_torch(pkgs: list[pk.Package], test: bool) -> bool:
    reqs = [r for p in pkgs for r in (*p.dependencies, *(p.test_requires if test else ()))]
    return any(pk.req_name(r) == "torch" for r in reqs)


# ----------------------------------------------------------------------------- torch base env
def _ensure_torch_base(session: nox.Session) -> Path:
    """A virtualenv holding only torch 2.13.0 (CPU build); returns its site-packages."""
    py = BASE_ENV / "bin" / "python"
    marker = BASE_ENV / ".torch-2.13.0"
    if not marker.exists():
        session.run(sys.executable, "-m", "venv", "--clear", str(BASE_ENV), external=True)
        session.run(str(py), "-m", "pip", "install", "-q", TORCH, "numpy", external=True)
        marker.write_text("ok\n")
    out = session.run(
        str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        external=True, silent=True,
    )  # fmt: skip
    return Path(str(out).strip().splitlines()[-1])


def _link_torch(session: nox.Session, python: str = "python") -> None:
    """Expose the base environment's torch to ``python``'s environment through a .pth file."""
    site = _ensure_torch_base(session)
    out = session.run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        silent=True, external=python != "python",
    )  # fmt: skip
    venv_site = Path(str(out).strip().splitlines()[-1])
    (venv_site / "_ds_torch_base.pth").write_text(f"{site}\n")


# ----------------------------------------------------------------------------- wheels
def _wheels(session: nox.Session, pkgs: list[pk.Package]) -> None:
    """Build the wheels of ``pkgs`` into .nox/_wheels once: a wheel newer than every file of its
    package is kept, so each package is built once per change, not once per environment that
    needs it. One small environment holds hatchling for every build."""
    py = BUILD_ENV / "bin" / "python"
    marker = BUILD_ENV / ".hatchling"
    if not marker.exists():
        session.run(sys.executable, "-m", "venv", "--clear", str(BUILD_ENV), external=True)
        session.run(str(py), "-m", "pip", "install", "-q", "hatchling>=1.24", external=True)
        marker.write_text("ok\n")
    session.run(str(py), str(TOOLS / "build_wheels.py"), "--no-build-isolation", "--dist",
                str(WHEELS), *[p.folder for p in pkgs], external=True)  # fmt: skip


def _install(
    session: nox.Session, package: str, test: bool, python: str = "python", *also: str
) -> None:
    """The README's install command (tools/install.py) from the prebuilt wheels: third-party
    requirements (and ``also``) from the index in one pip call, every ds-* package from the tree
    (pip --no-index) in a second. In a reused environment the tree's packages are reinstalled
    (pip keeps an installed version as it is, even when its files changed)."""
    args = [str(TOOLS / "install.py"), "--no-build", "--dist", str(WHEELS), "--python", python]
    args += ["--test"] * test + [f"--with={r}" for r in also]
    marker = None
    if python == "python":
        marker = Path(session.virtualenv.location) / ".ds-installed"
        args += ["--force-reinstall"] * marker.exists()
    session.run(python, *args, package, "--", "-q", external=python != "python")
    if marker is not None:
        marker.write_text("the tree's packages are installed here\n")


# ----------------------------------------------------------------------------- sessions
@nox.session(python=PYTHON)
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """One package's tests in its own environment: the package, its declared dependencies and
    its test extra only. GPU tests (marker gpu) run only with DS_TEST_GPU=1."""
    report = REPORTS / (package + ".xml")
    report.unlink(missing_ok=True)  # a session that fails before pytest leaves no stale report
    pkgs = pk.closure(PKGS[package], PKGS, with_test=True)
    if _needs_torch(pkgs, test=True):
        _link_torch(session)
    _wheels(session, pkgs)
    gpu = os.environ.get("DS_TEST_GPU") == "1"
    _install(session, package, True, "python", "pytest-timeout>=2.3")
    marker = [] if gpu else ["-m", "not gpu"]
    session.chdir(PKGS[package].path)
    session.run(
        "python", "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--timeout=900",
        f"--junitxml={report}", "--durations=10",
        "-o", "markers=gpu: needs an accelerator (run with DS_TEST_GPU=1 on a GPU machine)",
        *marker, *session.posargs, success_codes=[0, 5],
    )  # fmt: skip


@nox.session(python=False)
def isolation(session: nox.Session) -> None:
    """Each package installed alone by the README's command (tools/install.py: its wheel and
    its declared dependencies only) in a fresh environment, and every public name imported.
    Every package is tried; the failures are listed at the end."""
    _wheels(session, list(PKGS.values()))
    failed = []
    for p in PKGS.values():
        env = ROOT / ".nox" / "_isolation" / p.folder
        py = str(env / "bin" / "python")
        try:
            session.run(sys.executable, "-m", "venv", "--clear", str(env), external=True)
            if _needs_torch(pk.closure(p, PKGS), test=False):
                _link_torch(session, py)
            _install(session, p.folder, test=False, python=py)
            if not p.imports:
                session.warn(f"{p.folder}: no package with an __init__.py under src/")
                failed.append(p.folder)
            for module in p.imports:
                session.run(py, str(TOOLS / "import_public.py"), module, external=True)
        except nox.command.CommandFailed:
            failed.append(p.folder)
        else:  # recreated by every run: a passing one need not stay on disk
            shutil.rmtree(env, ignore_errors=True)
    if failed:
        session.error(f"installed alone, these packages failed to install or import: {failed}")


@nox.session(python=PYTHON)
def boundaries(session: nox.Session) -> None:
    """Undeclared ds_* imports, edges outside the design's graph, and cycles fail."""
    session.install("-q", "pytest")
    session.run(
        "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tools" / "tests")
    )
    session.run("python", str(ROOT / "tools" / "check_boundaries.py"))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("-q", "ruff==0.17.6")
    session.run("ruff", "check", str(ROOT))
    session.run("ruff", "format", "--check", str(ROOT))


# name -> the benchmark's argv (run from the repository root; "{tmp}" is a scratch directory on
# the project's disk). Each writes benchmarks/results/<scenario>-<device>-<yyyymmdd>.json with the
# peer measured in the same run.
CPU_BENCHES: dict[str, list[str]] = {
    "zero": ["benchmarks/zero/cpu_compare.py", "--steps", "30"],
    "ckpt": ["benchmarks/ckpt/ckpt_bench.py", "cpu", "--gb", "1.5", "--dir", "{tmp}/ckpt"],
    "aio": ["benchmarks/offload/aio_bench.py", "--dir", "{tmp}", "--device-name", "cpu-dev"],
    "cpu-adam": ["benchmarks/kernels/cpu_adam_bench.py"],
    "comm-logger": ["benchmarks/comm/logger_overhead.py"],
    "launcher": ["benchmarks/launcher/bench_launch.py"],
    "moe": [
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("benchmarks/moe/moe_bench.py", "--device", "cpu", "--hidden", "256"),
        *("--tokens", "4096", "--dtype", "fp32"),
    ],
    "fault": ["benchmarks/fault/run_fault_trials.py"],
}


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmarks that run on this machine's CPUs, each beside its peer (DeepSpeed 0.19.8,
    torch, torchrun, dd) in the same run: `nox -s bench -- zero ckpt` (default: all of
    CPU_BENCHES). GPU machines have no registry and no nox: there, run
    `bash benchmarks/gpu_session.sh io moe offload tests` (see that script)."""
    names = session.posargs or list(CPU_BENCHES)
    unknown = [n for n in names if n not in CPU_BENCHES]
    if unknown:
        session.error(f"unknown benchmark(s) {unknown}; choose from {sorted(CPU_BENCHES)}")
    _link_torch(session)
    _wheels(session, pk.closure(PKGS["ds-all"], PKGS))
    _install(session, "ds-all", test=False)
    session.install("-q", "matplotlib", "deepspeed==0.19.8")
    session.chdir(ROOT)
    scratch = ROOT / ".nox" / "_bench_scratch"  # the project's disk: /tmp may be a tmpfs
    session.run("rm", "-rf", str(scratch), external=True)
    scratch.mkdir(parents=True)
    for n in names:
        session.log(f"benchmark {n}: results go to benchmarks/results/")
        session.run(
            "python",
            *[a.format(tmp=scratch) for a in CPU_BENCHES[n]],
            env={"DS_ACCELERATOR": "cpu"},
        )
    session.run("rm", "-rf", str(scratch), external=True)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job: ds-launch starts 2 ranks (CPU processes, or the GPUs when present), a
    character GPT learns the project's docs with ZeRO-3, checkpoints, resumes in new processes,
    and the loss curve is written to out/demo/loss.png."""
    _link_torch(session)
    _wheels(session, pk.closure(PKGS["ds-all"], PKGS))
    _install(session, "ds-all", test=False)
    session.install("-q", "matplotlib")
    out = ROOT / "out" / "demo"
    session.run("rm", "-rf", str(out), external=True)
    out.mkdir(parents=True)
    ranks = session.posargs[0] if session.posargs else "2"
    common = ["--deepspeed_config", "examples/ds_config.json", "--save_dir", str(out / "ckpt"),
              "--log", str(out / "losses.jsonl")]  # fmt: skip
    session.chdir(ROOT)
    session.log("phase 1: train to step 250 and checkpoint")
    session.run(
        "ds-launch", "--num_gpus", ranks, "examples/train_gpt.py", "--steps", "250", *common
    )
    session.log("phase 2: new processes resume from the newest checkpoint and train to step 400")
    session.run(
        "ds-launch",
        "--num_gpus",
        ranks,
        "examples/train_gpt.py",
        "--steps",
        "400",
        "--resume",
        *common,
    )
    session.run(
        "python", "examples/plot_losses.py", str(out / "losses.jsonl"), str(out / "loss.png")
    )


@nox.session(python=False)
def summary(session: nox.Session) -> None:
    """The closing lines of a run: passed/failed/skipped per package and in all (from the junit
    reports of the tests sessions), the slowest tests and each package's test time."""
    session.run(sys.executable, str(TOOLS / "summarize_junit.py"), str(REPORTS),
                "--expect", ",".join(PACKAGES), external=True)  # fmt: skip
