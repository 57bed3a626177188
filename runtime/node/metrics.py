"""Counters, stage latencies and queue gauges of the acquisition node, kept in one place.

Layer: runtime, standard library only. ``medsec-edge serve`` runs for weeks beside a modality; an
operator needs to see, without reading logs, how many images came in, went out or were
quarantined, how deep the queues are, and whether each stage keeps its latency budget. One
``Metrics`` object collects that from every worker thread (one lock) and renders it two ways: a
JSON-ready ``snapshot()`` for ``/status`` and ``medsec-edge status``, and ``prometheus()`` text
for ``/metrics`` scrapers.

Latency percentiles are nearest-rank over the last ``window`` values of a stage (a bounded deque,
so memory stays flat however long the node runs); ``n`` and ``mean`` cover the whole uptime.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable

_log = logging.getLogger(__name__)

PREFIX = "medsec_edge_node_"
# Integer percents keep the nearest rank exact (0.99 * n in floating point can round up a rank).
_PERCENTS = (50, 99)
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _nearest_rank(sorted_values: list[float], percent: int) -> float:
    """The smallest value with at least ``percent`` % of the values at or below it."""
    rank = max(1, -(-percent * len(sorted_values) // 100))
    return sorted_values[rank - 1]


def _ms(value: float) -> float:
    return round(value, 2)


def sanitize_name(name: str) -> str:
    """A metric name part reduced to ``[a-zA-Z0-9_]`` (anything else becomes ``_``)."""
    return _NAME_BAD.sub("_", name) or "_"


def escape_label(value: str) -> str:
    """A label value escaped as the exposition format requires (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Stage:
    __slots__ = ("n", "total_ms", "window")

    def __init__(self, window: int) -> None:
        self.window: deque[float] = deque(maxlen=window)
        self.n = 0
        self.total_ms = 0.0


class Metrics:
    """Thread-safe counters, per-stage latency windows, budget misses and gauges."""

    def __init__(self, window: int = 2048) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 value, got {window}")
        self._window = window
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._counters: dict[str, int] = {}
        self._budget_misses: dict[str, int] = {}
        self._stages: dict[str, _Stage] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def observe(self, stage: str, ms: float) -> None:
        """Record one latency of ``stage`` in milliseconds."""
        ms = float(ms)
        if not math.isfinite(ms):
            # A broken clock reading must not poison the mean or the JSON (NaN is not JSON).
            _log.debug("dropped non-finite latency %r for stage %s", ms, stage)
            return
        with self._lock:
            entry = self._stages.get(stage)
            if entry is None:
                entry = self._stages[stage] = _Stage(self._window)
            entry.window.append(ms)
            entry.n += 1
            entry.total_ms += ms

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (received, processed, forwarded, quarantined, ...)."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def budget_miss(self, stage: str) -> None:
        """Count one image whose ``stage`` took longer than its budget."""
        with self._lock:
            self._budget_misses[stage] = self._budget_misses.get(stage, 0) + 1

    def gauge(self, name: str, fn: Callable[[], float]) -> None:
        """Register ``fn``, read at snapshot time (a queue depth); replaces one of the same name."""
        with self._lock:
            self._gauges[name] = fn

    def _read_gauges(self) -> dict[str, float]:
        with self._lock:
            gauges = list(self._gauges.items())
        values: dict[str, float] = {}
        # Called outside the lock: a gauge may be slow or may itself touch these metrics.
        for name, fn in gauges:
            try:
                value = fn()
                if isinstance(value, bool) or not isinstance(value, int):
                    value = float(value)
            except Exception:  # noqa: BLE001 - a broken gauge must not take the status page down
                _log.debug("gauge %s failed", name, exc_info=True)
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            values[name] = value
        return values

    def _copy(self) -> tuple[float, dict[str, int], dict[str, int], dict[str, tuple]]:
        """A consistent copy taken under the lock; sorting and formatting happen outside it."""
        with self._lock:
            uptime_s = time.monotonic() - self._started
            counters = dict(self._counters)
            misses = dict(self._budget_misses)
            windows = {
                name: (list(entry.window), entry.n, entry.total_ms)
                for name, entry in self._stages.items()
                if entry.n
            }
        stages = {name: (sorted(w), n, total) for name, (w, n, total) in windows.items()}
        return uptime_s, counters, misses, stages

    def snapshot(self) -> dict:
        """A JSON-ready view: uptime, counters, gauges, budget misses and stage latencies (ms)."""
        gauges = self._read_gauges()
        uptime_s, counters, misses, stages = self._copy()
        stage_view = {}
        for name, (values, n, total_ms) in stages.items():
            stage_view[name] = {
                "p50": _ms(_nearest_rank(values, 50)),
                "p99": _ms(_nearest_rank(values, 99)),
                "max": _ms(values[-1]),
                "n": n,
                "mean": _ms(total_ms / n),
            }
        return {
            "uptime_s": round(uptime_s, 3),
            "counters": counters,
            "gauges": gauges,
            "budget_misses": misses,
            "stages": stage_view,
        }

    def prometheus(self) -> str:
        """The metrics in Prometheus text exposition format 0.0.4."""
        gauges = self._read_gauges()
        uptime_s, counters, misses, stages = self._copy()
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family(f"{PREFIX}uptime_seconds", "gauge", "Seconds since the node started.")
        lines.append(f"{PREFIX}uptime_seconds {_number(round(uptime_s, 3))}")

        # Two names that sanitize alike ("a-b", "a_b") must still give one family each.
        merged: dict[str, int] = {}
        for name, value in counters.items():
            key = sanitize_name(name)
            key = key.removesuffix("_total")
            merged[key] = merged.get(key, 0) + value
        for key in sorted(merged):
            metric = f"{PREFIX}{key}_total"
            family(metric, "counter", f"Count of {key} events.")
            lines.append(f"{metric} {merged[key]}")

        merged_gauges = {sanitize_name(name): value for name, value in gauges.items()}
        for key in sorted(merged_gauges):
            metric = f"{PREFIX}{key}"
            family(metric, "gauge", f"Current value of {key}.")
            lines.append(f"{metric} {_number(merged_gauges[key])}")

        if misses:
            metric = f"{PREFIX}budget_misses_total"
            family(metric, "counter", "Images whose stage took longer than its latency budget.")
            for stage in sorted(misses):
                lines.append(f'{metric}{{stage="{escape_label(stage)}"}} {misses[stage]}')

        if stages:
            metric = f"{PREFIX}stage_latency_ms"
            family(metric, "summary", "Stage latency in milliseconds (quantiles over the recent window).")
            for stage in sorted(stages):
                values, n, total_ms = stages[stage]
                label = escape_label(stage)
                for percent in _PERCENTS:
                    quantile = f"{percent / 100:g}"
                    value = _number(_nearest_rank(values, percent))
                    lines.append(f'{metric}{{stage="{label}",quantile="{quantile}"}} {value}')
                lines.append(f'{metric}_sum{{stage="{label}"}} {_number(total_ms)}')
                lines.append(f'{metric}_count{{stage="{label}"}} {n}')
        return "\n".join(lines) + "\n"
