"""Metrics: nearest-rank percentiles, exact counts under threads, and parseable Prometheus text."""

from __future__ import annotations

import json
import re
import threading

import pytest

from medsec_edge.runtime.node.metrics import Metrics, escape_label, sanitize_name

_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    rf"(?P<labels>\{{{_LABEL}(?:,{_LABEL})*\}})?"
    r" (?P<value>NaN|[+-]Inf|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$"
)
_META = re.compile(r"^# (?P<kind>HELP|TYPE) (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<rest>.+)$")


def parse_exposition(text: str) -> tuple[dict[str, str], dict[str, int], list[tuple[str, str, str]]]:
    """Check every line against the 0.0.4 grammar; TYPE per family, HELP counts, samples."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: dict[str, int] = {}
    samples = []
    for line in text.splitlines():
        meta = _META.match(line)
        if meta:
            name = meta["name"]
            if meta["kind"] == "TYPE":
                assert name not in types, f"TYPE twice for {name}"
                assert meta["rest"] in {"counter", "gauge", "summary", "histogram", "untyped"}
                types[name] = meta["rest"]
            else:
                helps[name] = helps.get(name, 0) + 1
            continue
        sample = _SAMPLE.match(line)
        assert sample, f"not an exposition line: {line!r}"
        samples.append((sample["name"], sample["labels"] or "", sample["value"]))
    for name, _, _ in samples:
        family = re.sub(r"_(sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} has no TYPE"
    return types, helps, samples


def test_percentiles_are_nearest_rank_on_known_data():
    metrics = Metrics()
    for ms in range(100, 0, -1):  # descending, so the window must be sorted
        metrics.observe("embed", float(ms))
    stage = metrics.snapshot()["stages"]["embed"]
    assert stage == {"p50": 50.0, "p99": 99.0, "max": 100.0, "n": 100, "mean": 50.5}


def test_small_samples_and_rounding():
    metrics = Metrics()
    metrics.observe("seal", 1.23456)
    assert metrics.snapshot()["stages"]["seal"] == {
        "p50": 1.23, "p99": 1.23, "max": 1.23, "n": 1, "mean": 1.23,
    }
    for ms in (10.0, 20.0, 30.0):
        metrics.observe("check", ms)
    check = metrics.snapshot()["stages"]["check"]
    assert (check["p50"], check["p99"], check["max"]) == (20.0, 30.0, 30.0)


def test_window_bounds_percentiles_but_not_totals():
    metrics = Metrics(window=10)
    for ms in range(1, 101):
        metrics.observe("embed", float(ms))
    stage = metrics.snapshot()["stages"]["embed"]
    # Window holds 91..100: rank ceil(0.5 * 10) = 5 -> 95.
    assert (stage["p50"], stage["p99"], stage["max"]) == (95.0, 100.0, 100.0)
    assert (stage["n"], stage["mean"]) == (100, 50.5)


def test_window_must_be_positive():
    with pytest.raises(ValueError):
        Metrics(window=0)


def test_counters_budget_misses_and_empty_stage_omitted():
    metrics = Metrics()
    metrics.count("received")
    metrics.count("received", 4)
    metrics.count("refused")
    metrics.budget_miss("embed")
    metrics.budget_miss("embed")
    metrics.observe("nan-stage", float("nan"))
    snap = metrics.snapshot()
    assert snap["counters"] == {"received": 5, "refused": 1}
    assert snap["budget_misses"] == {"embed": 2}
    assert snap["stages"] == {}  # a budget miss or a dropped NaN does not make an empty stage
    assert snap["uptime_s"] >= 0
    json.dumps(snap, allow_nan=False)


def test_gauges_read_at_snapshot_and_broken_ones_skipped():
    depth = [3]
    metrics = Metrics()
    metrics.gauge("queue_received", lambda: depth[0])
    metrics.gauge("queue_outgoing", lambda: 1 / 0)
    metrics.gauge("quarantine", lambda: float("nan"))
    assert metrics.snapshot()["gauges"] == {"queue_received": 3}
    depth[0] = 7
    assert metrics.snapshot()["gauges"] == {"queue_received": 7}
    text = metrics.prometheus()
    assert "medsec_edge_node_queue_received 7\n" in text
    assert "queue_outgoing" not in text and "quarantine" not in text


def test_counts_are_exact_under_threads():
    metrics = Metrics(window=64)
    threads_n, per_thread = 8, 5000
    barrier = threading.Barrier(threads_n)

    def work(i: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            metrics.count("received")
            metrics.count("bytes", 2)
            metrics.observe("embed", float(j % 10))
            if j % 100 == 0:
                metrics.budget_miss("embed")
                metrics.snapshot()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = metrics.snapshot()
    total = threads_n * per_thread
    assert snap["counters"] == {"received": total, "bytes": 2 * total}
    assert snap["stages"]["embed"]["n"] == total
    assert snap["stages"]["embed"]["mean"] == 4.5
    assert snap["budget_misses"] == {"embed": threads_n * per_thread // 100}


def test_prometheus_text_parses_and_carries_the_values():
    metrics = Metrics()
    metrics.count("received", 3)
    metrics.count("forwarded", 2)
    metrics.budget_miss("embed")
    metrics.budget_miss("seal")
    metrics.gauge("queue_received", lambda: 4)
    for ms in range(1, 101):
        metrics.observe("embed", float(ms))
    metrics.observe("seal", 2.5)

    types, helps, samples = parse_exposition(metrics.prometheus())
    assert all(count == 1 for count in helps.values())
    assert set(helps) == set(types)
    values = {name + labels: value for name, labels, value in samples}

    assert types["medsec_edge_node_received_total"] == "counter"
    assert values["medsec_edge_node_received_total"] == "3"
    assert values["medsec_edge_node_forwarded_total"] == "2"
    assert types["medsec_edge_node_queue_received"] == "gauge"
    assert values["medsec_edge_node_queue_received"] == "4"
    assert types["medsec_edge_node_budget_misses_total"] == "counter"
    assert values['medsec_edge_node_budget_misses_total{stage="embed"}'] == "1"
    assert values['medsec_edge_node_budget_misses_total{stage="seal"}'] == "1"
    assert types["medsec_edge_node_stage_latency_ms"] == "summary"
    summary = "medsec_edge_node_stage_latency_ms"
    assert float(values[f'{summary}{{stage="embed",quantile="0.5"}}']) == 50.0
    assert float(values[f'{summary}{{stage="embed",quantile="0.99"}}']) == 99.0
    assert float(values[f'{summary}_sum{{stage="embed"}}']) == 5050.0
    assert values[f'{summary}_count{{stage="embed"}}'] == "100"
    assert values[f'{summary}_count{{stage="seal"}}'] == "1"
    assert all(name.startswith("medsec_edge_node_") for name, _, _ in samples)


def test_prometheus_escapes_labels_and_sanitizes_names():
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert sanitize_name("queue-depth.x") == "queue_depth_x"
    metrics = Metrics()
    stage = 'we"ird\\stage\nname'
    metrics.observe(stage, 1.0)
    metrics.budget_miss(stage)
    metrics.count("c-store.ok", 2)
    metrics.count("c_store_ok")  # sanitizes to the same name: one family, summed
    metrics.count("images_total")  # no doubled _total
    metrics.gauge("queue depth", lambda: 1.5)
    text = metrics.prometheus()
    _, _, samples = parse_exposition(text)
    values = {name + labels: value for name, labels, value in samples}
    assert values["medsec_edge_node_c_store_ok_total"] == "3"
    assert values["medsec_edge_node_images_total"] == "1"
    assert values["medsec_edge_node_queue_depth"] == "1.5"
    assert 'stage="we\\"ird\\\\stage\\nname"' in text
    assert len(text.splitlines()) == len([line for line in text.split("\n") if line])


def test_empty_metrics_still_valid_exposition():
    types, _, samples = parse_exposition(Metrics().prometheus())
    assert types == {"medsec_edge_node_uptime_seconds": "gauge"}
    assert [name for name, _, _ in samples] == ["medsec_edge_node_uptime_seconds"]
