"""Install packages of this repository from a clone, with their sibling dependencies built from
the same clone (no registry serves the ds-* packages):

    python tools/install.py ds-zero                 # ds-zero, ds-comm, ds-accel + torch, pydantic
    python tools/install.py ds-all ds-ckpt          # several
    python tools/install.py --test ds-ckpt          # with its test extra
    python tools/install.py 'ds-comm[mpi]'          # with an extra
    python tools/install.py --python .venv/bin/python ds-moe -- --upgrade   # another environment

It builds each needed package's wheel into dist/ (``--dist``), installs the third-party
requirements (torch, pydantic, ...) from your index, then the packages with ``pip install
--no-index --find-links dist``, so every ds-* package comes from this tree and never from an
index. The wheels stay in dist/ for reuse: ``pip install --find-links dist ds-zero`` works later.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _packages as pk  # noqa: E402


def install(
    names: list[str],
    *,
    dist: Path,
    python: str = sys.executable,
    test: bool = False,
    build: bool = True,
    isolation: bool = True,
    force_reinstall: bool = False,
    also: list[str] | tuple[str, ...] = (),
    pip_args: list[str] | tuple[str, ...] = (),
) -> None:
    pkgs = pk.discover()
    # "ds-comm[mpi]": the package and the extras asked for (their third-party requirements)
    extras = {n: n.partition("[")[2].rstrip("]") for n in names}
    roots = [pk.find(n.partition("[")[0], pkgs) for n in names]
    asked = {r.folder: [e for e in extras[n].split(",") if e] for n, r in zip(names, roots)}
    if test:
        asked = {k: sorted({*v, "test"}) for k, v in asked.items()}
    for r in roots:
        unknown = [e for e in asked[r.folder] if e not in r.extras]
        if unknown:
            raise SystemExit(f"{r.dist} has no extra {unknown}; its extras: {sorted(r.extras)}")
    group: dict[str, pk.Package] = {}
    for r in roots:
        for p in pk.closure(r, pkgs, with_test=test):
            group.setdefault(p.folder, p)
    if build:
        pk.build_wheels(list(group.values()), dist, isolation=isolation)
    pip = [python, "-m", "pip", "install", *pip_args]
    local = {p.dist for p in pkgs.values()}
    external: list[str] = list(also)
    for q in pk.external_requirements(list(group.values()), pkgs):
        if q not in external:
            external.append(q)
    for r in roots:
        for e in asked[r.folder]:
            external += [
                q for q in r.extras[e] if pk.req_name(q) not in local and q not in external
            ]
    if external:
        subprocess.run([*pip, *external], check=True)
    wanted = [
        f"{r.dist}[{','.join(asked[r.folder])}]" if asked[r.folder] else r.dist for r in roots
    ]
    subprocess.run([*pip, "--no-index", "--find-links", str(dist), *wanted], check=True)
    if force_reinstall:  # pip keeps an installed version as it is: refresh the tree's packages
        wheels = [w for p in group.values() for w in dist.glob(p.wheel_prefix() + "*.whl")]
        subprocess.run([*pip, "--no-index", "--no-deps", "--force-reinstall", *map(str, wheels)],
                       check=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pip_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pip_args = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="arguments after -- go to pip install",
    )
    ap.add_argument("packages", nargs="+", help="package names (ds-zero) or folders")
    ap.add_argument("--dist", type=Path, default=pk.ROOT / "dist", help="wheel folder (dist/)")
    ap.add_argument("--python", default=sys.executable, help="the environment to install into")
    ap.add_argument("--test", action="store_true", help="with the packages' test extra")
    ap.add_argument("--no-build", action="store_true", help="use the wheels already in --dist")
    ap.add_argument(
        "--with",
        dest="also",
        action="append",
        default=[],
        metavar="REQ",
        help="a further third-party requirement installed in the same pip call (repeatable)",
    )
    ap.add_argument(
        "--force-reinstall",
        action="store_true",
        help="reinstall the tree's packages even where the same version is installed",
    )
    ap.add_argument(
        "--no-build-isolation",
        action="store_true",
        help="build with the hatchling of this Python instead of a fresh build environment",
    )
    a = ap.parse_args(argv)
    install(
        a.packages,
        dist=a.dist,
        python=a.python,
        test=a.test,
        build=not a.no_build,
        isolation=not a.no_build_isolation,
        force_reinstall=a.force_reinstall,
        also=a.also,
        pip_args=pip_args,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
