"""Package boundary check: every ds_* import is declared, allowed by the design, and acyclic.

Run as ``python tools/check_boundaries.py`` (the ``boundaries`` nox session does). Exit 0 when
the tree is clean; otherwise one line per violation naming the file, the line and the fix.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent

#: The dependency graph of the design (an edge A -> B means "A may import B").
ALLOWED: dict[str, set[str]] = {
    "ds-accel": set(),
    "ds-comm": {"ds-accel"},
    "ds-kernels": {"ds-accel"},
    # ZeRO++ quantizes its weight gathers and gradient reductions with ds-kernels' op
    "ds-zero": {"ds-comm", "ds-accel", "ds-kernels"},
    "ds-offload": {"ds-kernels", "ds-accel"},
    "ds-pipe": {"ds-comm", "ds-accel"},
    "ds-moe": {"ds-comm", "ds-accel"},
    "ds-ckpt": {"ds-accel"},
    "ds-seq": {"ds-comm", "ds-accel"},
    "ds-tp": {"ds-comm", "ds-accel"},
    "ds-profile": set(),
    "ds-data": set(),
    "ds-launcher": set(),
    "ds-all": {
        "ds-accel",
        "ds-comm",
        "ds-kernels",
        "ds-zero",
        "ds-offload",
        "ds-pipe",
        "ds-moe",
        "ds-launcher",
        "ds-ckpt",
        "ds-profile",
        "ds-seq",
        "ds-data",
        "ds-tp",
    },  # fmt: skip
    # DeepSpeed's import name over ds-all; its `deepspeed` console script is ds-launch
    "ds-deepspeed": {"ds-all", "ds-launcher"},
}


def _req_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared(pyproject: Path) -> tuple[set[str], set[str]]:
    """(runtime dependency names, test-extra dependency names) of a package."""
    meta = tomllib.loads(pyproject.read_text())["project"]
    runtime = {_req_name(r) for r in meta.get("dependencies", [])}
    extras = meta.get("optional-dependencies", {})
    test = {_req_name(r) for name, reqs in extras.items() for r in reqs}
    return runtime, test


def ds_imports(path: Path) -> list[tuple[int, str]]:
    """(line, package name) for every import of a ds_* module in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for n in names:
            top = n.split(".")[0]
            if top.startswith("ds_"):
                found.append((node.lineno, top.replace("_", "-")))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def check(root: Path = ROOT) -> list[str]:
    errors: list[str] = []
    packages = {
        p.name: p for p in sorted((root / "packages").iterdir()) if (p / "pyproject.toml").exists()
    }
    graph: dict[str, set[str]] = {}
    for name, pkg in packages.items():
        runtime, test = declared(pkg / "pyproject.toml")
        siblings = {d for d in runtime if d in packages}
        graph[name] = siblings
        if name not in ALLOWED:
            errors.append(f"{pkg}: package {name} is not in the design's dependency graph; add it "
                          "to ALLOWED in tools/check_boundaries.py together with the design")  # fmt: skip
            continue
        for dep in sorted(siblings - ALLOWED[name]):
            errors.append(f"{pkg}/pyproject.toml: {name} declares {dep}, an edge the design does "
                          f"not allow ({name} may import only: {sorted(ALLOWED[name]) or 'none'})")  # fmt: skip
        for kind, folder, allowed in (
            ("src", pkg / "src", runtime),
            ("tests", pkg / "tests", runtime | test),
        ):
            for py in sorted(folder.rglob("*.py")) if folder.exists() else []:
                for line, dep in ds_imports(py):
                    if dep == name or dep not in packages:
                        if dep not in packages and dep != name:
                            errors.append(
                                f"{py}:{line}: imports {dep.replace('-', '_')}, which is no package of this repo"
                            )
                        continue
                    if dep not in allowed:
                        where = (
                            "dependencies" if kind == "src" else "dependencies or the test extra"
                        )
                        errors.append(f"{py}:{line}: imports {dep.replace('-', '_')} but {name}'s "
                                      f"pyproject.toml does not declare {dep} in its {where}")  # fmt: skip
                    elif kind == "src" and dep not in ALLOWED.get(name, set()):
                        errors.append(
                            f"{py}:{line}: {name} -> {dep} is not an edge of the design's graph"
                        )
    cycle = find_cycle(graph)
    if cycle:
        errors.append("dependency cycle between packages: " + " -> ".join(cycle))
    return errors


def main() -> int:
    errors = check()
    for e in errors:
        print(e)
    if errors:
        print(f"boundaries: {len(errors)} violation(s)")
        return 1
    print("boundaries: every ds_* import is declared and allowed; no cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
