"""The one results format of benchmarks/results/, and the writer every benchmark uses.

A results file is one JSON object::

    {
      "scenario": "zero3",                  what was measured (also the file name's first part)
      "device": "2 x NVIDIA H200",          the machine, named
      "date": "2026-11-22",                 YYYY-MM-DD, optionally followed by a time
      "runs": [                             one entry per system measured in this session
        {"system": "ds-zero-z3", "step_s": 0.1605, "tokens_per_s": 102087, "peak_mem_gb": 23.01},
        {"system": "fsdp2", ...}
      ],
      "ratios": {"ds-zero-z3/fsdp2 tokens_per_s": 1.147},   above 1 favours this project
      ...                                   any further fields (config, versions, raw samples)
    }

Each run names its ``system`` and carries the benchmark's time metric: ``step_s`` unless the file
names another in ``"metric"`` (one key or a list of keys, for example ``"save_s"`` or
``["write_gbps", "read_gbps"]``); a run has at least one of them as a number, unless it says why
it has none in ``"skipped"`` or ``"error"`` (a peer not installed, a run that failed). ``peak_mem_gb`` is
in every run (``null`` where memory was not measured); ``tokens_per_s`` where it applies.
Numbers are finite: NaN and Infinity are not JSON and are refused (write ``null``).

Use from a benchmark script (scripts run as ``python benchmarks/x/y.py``, so put this folder on
the path first)::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _results import write_results

    path = write_results(scenario="zero-cpu", device="2 x cpu", runs=runs, ratios=ratios,
                         config=cfg)          # -> benchmarks/results/zero-cpu-2-x-cpu-<date>.json

``write_results`` validates first (``ResultsError`` lists every problem) and also copies the file
into ``$OUT`` when that is set (the GPU machines hand back only ``$OUT``). The test suite checks
every committed file with ``validate_file`` (tools/tests/test_results_schema.py).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "ResultsError",
    "default_path",
    "device_slug",
    "runs_from_columns",
    "validate",
    "validate_file",
    "write_results",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?$")


class ResultsError(ValueError):
    """A results document that does not follow the schema; the message lists every problem."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _non_finite(x: Any, where: str) -> list[str]:
    """Paths of NaN/Infinity values anywhere in the document (JSON has no such numbers)."""
    if isinstance(x, float) and not math.isfinite(x):
        return [f"{where} is {x!r}: NaN/Infinity is not JSON; write null for 'not measured'"]
    if isinstance(x, Mapping):
        return [p for k, v in x.items() for p in _non_finite(v, f"{where}.{k}")]
    if isinstance(x, (list, tuple)):
        return [p for i, v in enumerate(x) for p in _non_finite(v, f"{where}[{i}]")]
    return []


def _metrics(doc: Mapping[str, Any], problems: list[str]) -> list[str]:
    metric = doc.get("metric", "step_s")
    names = [metric] if isinstance(metric, str) else metric
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        problems.append(
            f"'metric' must be a run key or a list of run keys (the time metric), got {metric!r}"
        )
        return ["step_s"]
    return names


def _check_run(i: int, run: Any, metrics: list[str]) -> list[str]:
    where = f"runs[{i}]"
    if not isinstance(run, Mapping):
        return [f"{where} must be an object with 'system', the time metric and 'peak_mem_gb'"]
    problems = []
    system = run.get("system")
    if not isinstance(system, str) or not system.strip():
        problems.append(f"{where} has no 'system' (a non-empty string naming what was measured)")
    else:
        where = f"runs[{i}] ({system})"
    not_run = any(isinstance(run.get(k), str) and run[k] for k in ("skipped", "error"))
    if not not_run and not any(_is_number(run.get(m)) for m in metrics):
        shown = metrics[0] if len(metrics) == 1 else f"one of {metrics}"
        problems.append(
            f"{where} has no time metric: it needs {shown} as a number (a benchmark timed by"
            " another key names it in the file's top-level 'metric')"
        )
    for key in [*metrics, "tokens_per_s"]:
        if key in run and run[key] is not None and not _is_number(run[key]):
            problems.append(f"{where}.{key} must be a finite number or null, got {run[key]!r}")
    if "peak_mem_gb" not in run:
        problems.append(f"{where} has no 'peak_mem_gb' (write null where memory was not measured)")
    elif run["peak_mem_gb"] is not None and not _is_number(run["peak_mem_gb"]):
        problems.append(
            f"{where}.peak_mem_gb must be a finite number or null, got {run['peak_mem_gb']!r}"
        )
    return problems


def validate(doc: Any) -> list[str]:
    """Every way ``doc`` departs from the schema, as readable sentences (empty: it follows it)."""
    if not isinstance(doc, Mapping):
        return [f"the document must be a JSON object, got {type(doc).__name__}"]
    problems: list[str] = []
    for key in ("scenario", "device"):
        if not isinstance(doc.get(key), str) or not doc[key].strip():
            problems.append(f"missing or empty '{key}' (a non-empty string)")
    date = doc.get("date")
    if not isinstance(date, str) or not _DATE.match(date):
        problems.append(f"'date' must be 'YYYY-MM-DD' (optionally with a time), got {date!r}")
    metrics = _metrics(doc, problems)
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        problems.append("'runs' must be a non-empty list: one object per system measured")
    else:
        for i, run in enumerate(runs):
            problems += _check_run(i, run, metrics)
    ratios = doc.get("ratios")
    if not isinstance(ratios, Mapping):
        problems.append("'ratios' must be an object of name -> number ({} when there is no peer)")
    else:
        for name, value in ratios.items():
            if not _is_number(value):
                problems.append(f"ratios[{name!r}] must be a finite number, got {value!r}")
    problems += _non_finite(doc, "document")
    return problems


def _reject_constant(name: str) -> float:
    raise ResultsError(f"{name} is not JSON; write null for 'not measured'")


def validate_file(path: str | Path) -> list[str]:
    """The problems of one results file (parse errors included), each prefixed by its name."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(), parse_constant=_reject_constant)
    except (ValueError, OSError) as e:
        return [f"{path.name}: not a readable JSON file: {e}"]
    return [f"{path.name}: {p}" for p in validate(doc)]


def runs_from_columns(columns: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-system tables turned into runs: ``{"step_ms": {"ours": 1.0, "torch": 2.0}}`` ->
    ``[{"system": "ours", "step_ms": 1.0, "peak_mem_gb": None}, ...]`` (systems in order of first
    appearance; ``peak_mem_gb`` is None unless a column gives it)."""
    systems: dict[str, dict[str, Any]] = {}
    for key, table in columns.items():
        for system, value in table.items():
            systems.setdefault(system, {"system": system})[key] = value
    return [{**run, "peak_mem_gb": run.get("peak_mem_gb")} for run in systems.values()]


def device_slug(device: str) -> str:
    """A device name as it appears in file names: '2 x NVIDIA H200' -> '2xnvidia-h200'."""
    s = re.sub(r"\s*x\s+", "x", device.strip().lower())
    return re.sub(r"[^a-z0-9.]+", "-", s).strip("-") or "unknown"


def default_path(scenario: str, device: str, date: str, suffix: str = "") -> Path:
    """benchmarks/results/<scenario>-<device>-<yyyymmdd><suffix>.json"""
    day = date[:10].replace("-", "")
    name = f"{device_slug(scenario)}-{device_slug(device)}-{day}{suffix}.json"
    return RESULTS_DIR / name


def write_results(
    *,
    scenario: str,
    device: str,
    runs: Sequence[Mapping[str, Any]],
    ratios: Mapping[str, float] | None = None,
    date: str | None = None,
    path: str | Path | None = None,
    copy_to_out: bool = True,
    **extra: Any,
) -> Path:
    """Validate and write one results file; returns its path.

    ``path`` defaults to :func:`default_path` (a folder puts the default name in it). ``extra``
    holds the benchmark's own fields (config, versions, raw samples). ``date`` defaults to now
    (UTC, to the second). The same text goes to ``$OUT/<name>`` when ``OUT`` is set."""
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    doc = {
        "scenario": scenario,
        "device": device,
        "date": date,
        **extra,
        "runs": [dict(r) for r in runs],
        "ratios": dict(ratios or {}),
    }
    problems = validate(doc)
    if problems:
        raise ResultsError(f"results for {scenario!r} do not follow the schema:\n  - "
                           + "\n  - ".join(problems))  # fmt: skip
    target = default_path(scenario, device, date) if path is None else Path(path)
    if target.is_dir():
        target = target / default_path(scenario, device, date).name
    text = json.dumps(doc, indent=1, allow_nan=False, default=str) + "\n"  # Paths as text
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    out = os.environ.get("OUT")
    if copy_to_out and out and Path(out).resolve() != target.parent.resolve():
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, target.name).write_text(text)
    return target
