"""One noxfile for the monorepo: sessions parametrized over the packages.

    nox                       lint, boundaries, isolation and every package's tests (what CI runs)
    nox -s "tests(package='ds-zero')"   one package's tests
    nox -s demo               the main job: a small GPT on 2 CPU ranks (needs ds-all)
    nox -s bench -- NAME...   CPU benchmarks beside their peers (see CPU_BENCHES)

torch is big (about 30 s to install per environment on 2 cores), so it is installed once into a
base environment and exposed to every package environment through a ``.pth`` file: each package
environment is still fresh and gets only its own package, its declared dependencies and its test
extra installed, but torch 2.13.0 (CPU build) is shared rather than copied ten times.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).resolve().parent
PACKAGES_DIR = ROOT / "packages"
PACKAGES = sorted(p.name for p in PACKAGES_DIR.iterdir() if (p / "pyproject.toml").exists())
TORCH = "torch==2.13.0"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
BASE_ENV = ROOT / ".nox" / "_torch_base"
REPORTS = ROOT / ".nox" / "_reports"

nox.options.sessions = ["lint", "boundaries", "isolation", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True


# ----------------------------------------------------------------------------- metadata
def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _project(pkg: str) -> dict:
    return tomllib.loads((PACKAGES_DIR / pkg / "pyproject.toml").read_text())["project"]


def _siblings(reqs: list[str]) -> list[str]:
    return [_name(r) for r in reqs if _name(r) in PACKAGES]


def _closure(pkg: str, with_test: bool) -> list[str]:
    """The package and every sibling it needs (through dependencies, plus its test extra)."""
    seen: list[str] = []
    todo = [pkg]
    first = True
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.append(cur)
        meta = _project(cur)
        todo += _siblings(meta.get("dependencies", []))
        if first and with_test:
            todo += _siblings(meta.get("optional-dependencies", {}).get("test", []))
        first = False
    return seen


def _needs_torch(pkgs: list[str]) -> bool:
    for p in pkgs:
        meta = _project(p)
        reqs = meta.get("dependencies", []) + meta.get("optional-dependencies", {}).get("test", [])
        if any(_name(r) == "torch" for r in reqs):
            return True
    return False


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


def _link_torch(session: nox.Session) -> None:
    site = _ensure_torch_base(session)
    out = session.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True
    )
    venv_site = Path(str(out).strip().splitlines()[-1])
    (venv_site / "_ds_torch_base.pth").write_text(f"{site}\n")


def _install_local(session: nox.Session, pkgs: list[str], test_extra_of: str | None) -> None:
    """Install local packages (non-editable wheels built with hatchling) in one pip call, so pip
    satisfies sibling ranges such as ds-comm>=0.1,<0.2 from the tree, never from an index."""
    session.install("-q", "hatchling>=1.24")
    args = []
    for p in pkgs:
        path = str(PACKAGES_DIR / p)
        args.append(f"{path}[test]" if p == test_extra_of else path)
    session.install("-q", "--no-build-isolation", *args)


# ----------------------------------------------------------------------------- sessions
@nox.session(python=PYTHON)
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """One package's tests in its own environment: the package, its declared dependencies and
    its test extra only. GPU tests (marker gpu) run only with DS_TEST_GPU=1."""
    pkgs = _closure(package, with_test=True)
    if _needs_torch(pkgs):
        _link_torch(session)
    session.install("-q", "pytest-timeout>=2.3")
    _install_local(session, pkgs, test_extra_of=package)
    marker = [] if os.environ.get("DS_TEST_GPU") == "1" else ["-m", "not gpu"]
    session.chdir(PACKAGES_DIR / package)
    session.run(
        "python", "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--timeout=900",
        f"--junitxml={REPORTS / (package + '.xml')}",
        "-o", "markers=gpu: needs an accelerator (run with DS_TEST_GPU=1 on a GPU machine)",
        *marker, *session.posargs, success_codes=[0, 5],
    )  # fmt: skip


@nox.session(python=PYTHON)
def isolation(session: nox.Session) -> None:
    """Each package's wheel installed alone (with only its declared dependencies) in a fresh
    environment, and every public name imported."""
    dist = ROOT / ".nox" / "_wheels"
    session.install("-q", "build", "hatchling>=1.24")
    session.run("rm", "-rf", str(dist), external=True)
    for p in PACKAGES:
        session.run("python", "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(PACKAGES_DIR / p))  # fmt: skip
    wheels = {p: next(dist.glob(p.replace("-", "_") + "-*.whl")) for p in PACKAGES}
    for p in PACKAGES:
        env = ROOT / ".nox" / "_isolation" / p
        session.run(sys.executable, "-m", "venv", "--clear", str(env), external=True)
        py = str(env / "bin" / "python")
        closure = _closure(p, with_test=False)
        if _needs_torch(closure):
            site = _ensure_torch_base(session)
            purelib = session.run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                                  external=True, silent=True)  # fmt: skip
            Path(str(purelib).strip().splitlines()[-1], "_ds_torch_base.pth").write_text(
                f"{site}\n"
            )
        session.run(
            py, "-m", "pip", "install", "-q", *[str(wheels[c]) for c in closure], external=True
        )
        session.run(
            py, str(ROOT / "tools" / "import_public.py"), p.replace("-", "_"), external=True
        )


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
    _install_local(session, _closure("ds-all", with_test=False), test_extra_of=None)
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
    _install_local(session, _closure("ds-all", with_test=False), test_extra_of=None)
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
