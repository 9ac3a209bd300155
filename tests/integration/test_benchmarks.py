"""Benchmarks still run (quick mode): they print a JSON document and a Markdown table.

No timing is asserted here: figures come from `make bench` and live in docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_quick(script: str) -> dict:  # type: ignore[type-arg]
    res = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc, _, table = res.stdout.partition("\n\n")
    assert table.lstrip().startswith("|"), res.stdout[-2000:]
    return json.loads(doc)  # type: ignore[no-any-return]


@pytest.mark.parametrize("script", ["bench_events.py", "bench_compare.py", "bench_queries.py"])
def test_benchmark_runs_in_quick_mode(script: str) -> None:
    result = run_quick(script)
    assert result["machine"]["cores"] and result["date"] and "--quick" in result["command"]
    if script == "bench_events.py":
        assert result["latency"]["samples"] > 0
        assert result["throughput"]["events"] > 0
    elif script == "bench_queries.py":
        q, b = result["queries"], result["bulk"]
        for server in ("qvirtd", "floor_stdlib", "floor_pydantic-core"):
            assert q[server]["cpu_us"] >= 0 and q[server]["per_s"]["8"] > 0
        assert b["list_all_info"]["wall_ms"] > 0 and b["domstats"]["wall_ms"] > 0
        assert b["frozen_marked_stale"] is True
    else:
        assert set(result["start"]) == {"1", "3"} and result["queries"]["8"] > 0
        assert result["frozen"]["destroy_s"] > 0 and result["memory"]["rss_kib"] > 0
        assert result["events"]["events_per_s"] > 0
        assert result["events_idle"]["events_per_s"] > 0
