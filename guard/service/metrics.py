"""Prometheus metrics of the service (``GET /metrics``): decisions, and whether relative thresholds hold.

Read at scrape time from the ``CalibrationMonitor`` of every guard the service runs (the default policy's and
each API key's; no second set of counters to keep in step), through the official ``prometheus_client`` in a
registry of the app's own, so two apps in one process do not collide. Only mounted when ``prometheus_client`` is
installed (``pip install 'memguard[serve]'``).

Series (every one labelled with the guard's ``policy``; ``rule``, ``metric``, ``calibration``, ``above_fpr`` on the
threshold ones):

* ``memguard_decisions_total{action}``
* ``memguard_threshold_decisions_total`` / ``memguard_threshold_crossed_total``: decisions judged with the
  calibration, and those whose value crossed the rule's threshold; their ratio is the observed rate.
* ``memguard_threshold_promised_rate{bound="expected"|"low"|"high"}``: what the calibration promised.
* ``memguard_threshold_drift``: 1 too many, -1 too few, 0 consistent (at the last look, see guard/monitor.py).
* ``memguard_calibration_mismatch{check}``: 1 when a fit check of the calibration failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["add_metrics_route", "metrics_registry"]

_DRIFT = {"too many": 1.0, "too few": -1.0}


def metrics_registry(guards: Any | Sequence[Any]) -> Any:
    """A ``CollectorRegistry`` whose one collector reads each guard's ``core.monitor`` at each scrape."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    every = list(guards) if isinstance(guards, Sequence) else [guards]

    class MonitorCollector:
        def collect(self):
            decisions = CounterMetricFamily("memguard_decisions", "Decisions by action.", labels=["policy", "action"])
            labels = ["policy", "rule", "metric", "calibration", "above_fpr"]
            judged = CounterMetricFamily("memguard_threshold_decisions",
                                         "Decisions judged with the calibration of a relative threshold.",
                                         labels=labels)
            crossed = CounterMetricFamily("memguard_threshold_crossed",
                                          "Decisions whose value crossed the relative threshold.", labels=labels)
            promised = GaugeMetricFamily("memguard_threshold_promised_rate",
                                         "Rate of crossing the calibration promised (expected, low, high).",
                                         labels=[*labels, "bound"])
            drift = GaugeMetricFamily("memguard_threshold_drift",
                                      "1: too many crossings for the promise, -1: too few, 0: consistent.",
                                      labels=labels)
            mismatch = GaugeMetricFamily("memguard_calibration_mismatch",
                                         "1 when a fit check of the calibration in use failed.",
                                         labels=["policy", "check"])
            for guard in every:
                policy = guard.policy.name
                snapshot = guard.core.monitor.snapshot()
                for action, count in sorted(snapshot["actions"].items()):
                    decisions.add_metric([policy, action], count)
                for row in snapshot["thresholds"]:
                    key = [policy, row["rule"], row["metric"], row["calibration"], f"{row['above_fpr']:g}"]
                    judged.add_metric(key, row["decisions"])
                    crossed.add_metric(key, row["crossed"])
                    for bound in ("expected", "low", "high"):
                        field = "promised" if bound == "expected" else f"promised_{bound}"
                        promised.add_metric([*key, bound], row[field])
                    drift.add_metric(key, _DRIFT.get(row["verdict"] or "", 0.0))
                for check in ("caption_fit", "score_distribution"):
                    mismatch.add_metric([policy, check], 1.0 if check in snapshot["problems"] else 0.0)
            yield from (decisions, judged, crossed, promised, drift, mismatch)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector())
    return registry


def add_metrics_route(app: Any, guard: Any | Sequence[Any]) -> bool:
    """Mount ``GET /metrics`` for ``guard`` (or several) on ``app`` when ``prometheus_client`` is installed; returns
    whether it was."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    except ImportError:
        return False
    from fastapi.responses import Response

    registry = metrics_registry(guard)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return True
