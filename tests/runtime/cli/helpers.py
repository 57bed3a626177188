"""Reading what the commands print, shared by the CLI tests."""

from __future__ import annotations

import json


def json_lines(stdout: str) -> list[dict]:
    """Every line of ``--json`` output is one JSON object."""
    return [json.loads(line) for line in stdout.strip().splitlines()]


def run_report(stdout: str) -> dict:
    """``run --json``: one object per image, then the summary; together they are report.json."""
    *records, summary = json_lines(stdout)
    assert "records" not in summary and "images" in summary
    assert summary["images"] == len(records)
    return {**summary, "records": records}
