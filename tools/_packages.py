"""The monorepo's packages as data: every folder under packages/ with a pyproject.toml, its
distribution name, import names and sibling dependencies. Nothing here lists packages by hand, so
a package added under packages/ is picked up by the noxfile and the install tools as it is."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES_DIR = ROOT / "packages"


def req_name(req: str) -> str:
    """The normalised project name of a requirement string: 'ds_comm[mpi]>=0.1' -> 'ds-comm'."""
    return re.split(r"[\s\[<>=!~;(@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


@dataclass(frozen=True)
class Package:
    folder: str  # the directory name under packages/ (ds-zero)
    dist: str  # the distribution name pip knows (ds-zero; deepspeed for ds-deepspeed)
    path: Path
    dependencies: tuple[str, ...]
    test_requires: tuple[str, ...]
    extras: dict[str, tuple[str, ...]]

    @property
    def imports(self) -> list[str]:
        """The top-level modules it ships (the packages under src/)."""
        src = self.path / "src"
        return sorted(p.parent.name for p in src.glob("*/__init__.py"))

    def wheel_prefix(self) -> str:
        return re.sub(r"[-_.]+", "_", self.dist) + "-"


def discover(packages_dir: Path = PACKAGES_DIR) -> dict[str, Package]:
    """Every package folder with a pyproject.toml, by folder name, sorted."""
    out = {}
    for path in sorted(p for p in packages_dir.iterdir() if (p / "pyproject.toml").is_file()):
        project = tomllib.loads((path / "pyproject.toml").read_text())["project"]
        extras = project.get("optional-dependencies", {})
        out[path.name] = Package(
            folder=path.name,
            dist=req_name(project["name"]),
            path=path,
            dependencies=tuple(project.get("dependencies", [])),
            test_requires=tuple(extras.get("test", [])),
            extras={k: tuple(v) for k, v in extras.items()},
        )
    return out


def find(name: str, pkgs: dict[str, Package]) -> Package:
    """A package by folder name, distribution name, import name or path (packages/ds-zero)."""
    key = Path(name.rstrip("/")).name
    for p in pkgs.values():
        if key in (p.folder, p.dist, p.folder.replace("-", "_")) or key in p.imports:
            return p
    raise SystemExit(f"no package {name!r} under {PACKAGES_DIR}; choose from {sorted(pkgs)}")


def siblings(reqs: tuple[str, ...] | list[str], pkgs: dict[str, Package]) -> list[Package]:
    by_dist = {p.dist: p for p in pkgs.values()}
    return [by_dist[req_name(r)] for r in reqs if req_name(r) in by_dist]


def closure(root: Package, pkgs: dict[str, Package], with_test: bool = False) -> list[Package]:
    """The package and every sibling it needs: its dependencies, transitively, and with
    ``with_test`` its test extra's siblings (and theirs)."""
    seen: dict[str, Package] = {}
    todo = [root, *(siblings(root.test_requires, pkgs) if with_test else [])]
    while todo:
        cur = todo.pop()
        if cur.folder not in seen:
            seen[cur.folder] = cur
            todo += siblings(cur.dependencies, pkgs)
    return list(seen.values())


def external_requirements(group: list[Package], pkgs: dict[str, Package]) -> list[str]:
    """The runtime requirements of ``group`` that no package of the tree provides (torch,
    pydantic, ...)."""
    local = {p.dist for p in pkgs.values()}
    reqs: list[str] = []
    for p in group:
        for r in p.dependencies:
            if req_name(r) not in local and r not in reqs:
                reqs.append(r)
    return reqs


def _newest_source(p: Package) -> float:
    """The newest mtime among what goes into the wheel: src/, the package folder's own files
    (pyproject.toml, README, build hooks); not tests/ nor caches that test runs write."""
    files = [f for f in p.path.iterdir() if f.is_file()]
    files += [
        f
        for f in (p.path / "src").rglob("*")
        if f.is_file()
        and not any(part.startswith((".", "__pycache__")) for part in f.relative_to(p.path).parts)
    ]
    return max(f.stat().st_mtime for f in files)


def build_wheels(group: list[Package], dist: Path, isolation: bool = True, quiet: bool = True) -> list[Path]:  # fmt: skip
    """Build each package's wheel into ``dist`` (no dependencies), skipping one whose wheel
    there is newer than every file of the package; older wheels of a package are removed, so
    ``pip install --find-links dist`` finds exactly the tree's versions."""
    dist.mkdir(parents=True, exist_ok=True)
    out = []
    for p in group:
        have = sorted(dist.glob(p.wheel_prefix() + "*.whl"))
        if len(have) == 1 and have[0].stat().st_mtime > _newest_source(p):
            out.append(have[0])
            continue
        for w in have:
            w.unlink()
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(p.path)]
        cmd += ([] if isolation else ["--no-build-isolation"]) + (["-q"] if quiet else [])
        print(f"building {p.dist} from {p.path.relative_to(ROOT)}", flush=True)
        subprocess.run(cmd, check=True)
        built = sorted(dist.glob(p.wheel_prefix() + "*.whl"))
        if len(built) != 1:
            raise SystemExit(f"expected one {p.wheel_prefix()}*.whl in {dist}, found {built}")
        out.append(built[0])
    return out
