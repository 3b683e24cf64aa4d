"""Every committed benchmark results file follows the one schema (benchmarks/_results.py), and the
validator refuses what departs from it with a message naming the file and the problem."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _results  # noqa: E402

RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def _good() -> dict:
    return {
        "scenario": "zero3",
        "device": "2 x NVIDIA H200",
        "date": "2026-11-22",
        "runs": [
            {"system": "ds-zero-z3", "step_s": 0.16, "tokens_per_s": 102087, "peak_mem_gb": 23.0},
            {"system": "fsdp2", "step_s": 0.18, "tokens_per_s": 89000, "peak_mem_gb": 23.0},
        ],
        "ratios": {"ds-zero-z3/fsdp2 tokens_per_s": 1.147},
        "config": {"dim": 2048},
    }


def test_there_are_results_files():
    assert RESULTS, "benchmarks/results/ holds no JSON files"


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_committed_results_follow_the_schema(path: Path):
    problems = _results.validate_file(path)
    assert not problems, (
        f"benchmarks/results/{path.name} does not follow the results schema "
        "(see benchmarks/README.md; write it with benchmarks/_results.py:write_results):\n  "
        + "\n  ".join(problems)
    )


def test_a_good_document_passes():
    assert _results.validate(_good()) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("device"), "'device'"),
        (lambda d: d.update(date="22/11/2026"), "'date' must be 'YYYY-MM-DD'"),
        (lambda d: d.update(runs=[]), "'runs' must be a non-empty list"),
        (lambda d: d.pop("ratios"), "'ratios' must be an object"),
        (lambda d: d["ratios"].update(x="fast"), "ratios['x'] must be a finite number"),
        (lambda d: d["runs"][0].pop("system"), "runs[0] has no 'system'"),
        (lambda d: d["runs"][1].pop("step_s"), "runs[1] (fsdp2) has no time metric"),
        (lambda d: d["runs"][1].pop("peak_mem_gb"), "runs[1] (fsdp2) has no 'peak_mem_gb'"),
        (lambda d: d["runs"][0].update(tokens_per_s="many"), "tokens_per_s must be a finite"),
        (lambda d: d["runs"][0].update(peak_mem_gb=float("nan")), "NaN/Infinity is not JSON"),
        (lambda d: d.update(metric=["write_gbps"]), "it needs write_gbps as a number"),
        (lambda d: d.update(metric=3), "'metric' must be a run key"),
    ],
)
def test_each_departure_is_named(mutate, expected):
    doc = _good()
    mutate(doc)
    problems = _results.validate(doc)
    assert any(expected in p for p in problems), problems


def test_own_metric_and_not_run_entries():
    doc = _good()
    doc["metric"] = ["save_s", "load_s"]
    doc["runs"] = [
        {"system": "ds-ckpt", "save_s": 1.0, "load_s": None, "peak_mem_gb": None},
        {"system": "deepspeed", "skipped": "deepspeed is not installed"},
    ]
    problems = _results.validate(doc)
    # the skipped run still needs peak_mem_gb, nothing else
    assert problems == ["runs[1] (deepspeed) has no 'peak_mem_gb' (write null where memory was "
                        "not measured)"]  # fmt: skip


def test_file_problems_name_the_file(tmp_path):
    bad = tmp_path / "zero-cpu-2xcpu-20261122.json"
    doc = _good()
    bad.write_text(json.dumps(doc).replace("23.0", "NaN", 1))
    problems = _results.validate_file(bad)
    assert problems and all(p.startswith(bad.name + ": ") for p in problems), problems
    (tmp_path / "broken.json").write_text("{")
    assert "not a readable JSON file" in _results.validate_file(tmp_path / "broken.json")[0]


def test_writer_validates_then_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    good = _good()
    path = _results.write_results(path=tmp_path, **good)
    assert path.name == "zero3-2xnvidia-h200-20261122.json"
    assert json.loads(path.read_text()) == json.loads((tmp_path / "out" / path.name).read_text())
    assert _results.validate_file(path) == []
    doc = _good()
    doc["runs"][0].pop("peak_mem_gb")
    with pytest.raises(_results.ResultsError, match="runs\\[0\\] \\(ds-zero-z3\\) has no"):
        _results.write_results(path=tmp_path / "bad.json", **doc)
    assert not (tmp_path / "bad.json").exists()


def test_runs_from_columns():
    runs = _results.runs_from_columns(
        {"step_ms": {"ours": 1.0, "torch": 2.0}, "peak_mem_gb": {"ours": 0.5}}
    )
    assert runs == [
        {"system": "ours", "step_ms": 1.0, "peak_mem_gb": 0.5},
        {"system": "torch", "step_ms": 2.0, "peak_mem_gb": None},
    ]
