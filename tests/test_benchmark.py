"""The benchmark harness in its quick form: it must keep producing numbers.

It asserts that every row measured something, never how fast: speed targets are
ratios that belong to a full run on a quiet machine (docs/benchmarks.md).
"""

from __future__ import annotations

import pytest

from benchmarks.run import run

pytestmark = pytest.mark.timeout(180)


def test_quick_benchmark_produces_numbers() -> None:
    results = run(quick=True)

    rows = results["rows"]
    nexus = [
        row
        for row in rows
        if row["target"].startswith("nexus-proxy") and row["status"] != "skipped"
    ]
    assert nexus, "no nexus-proxy row was measured"
    for row in nexus:
        assert row["status"] == "ok", row
        assert row["rps"] > 0, row
    assert results["idle_rss_mib"] > 0
