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

Served by several replicas (``memguard serve --engine ray``), a scrape reaches one of them; that replica answers
for all of them (``gather``): every series then has a ``replica`` label, and each replica's counters are its own
(sum them in PromQL for the deployment's totals).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MonitorSample", "add_metrics_route", "guard_samples", "metrics_registry"]

_DRIFT = {"too many": 1.0, "too few": -1.0}


@dataclass(frozen=True)
class MonitorSample:
    """One guard's counters at one moment: its policy's name, ``CalibrationMonitor.snapshot()`` (plain data, so it
    can travel between processes) and the labels that tell it apart from other processes' (``replica``)."""

    policy: str
    snapshot: Mapping[str, Any]
    labels: Mapping[str, str] = field(default_factory=dict)


def guard_samples(guards: Any | Sequence[Any], labels: Mapping[str, str] | None = None) -> list[MonitorSample]:
    """The current counters of ``guards`` (their ``core.monitor``), each with ``labels``."""
    every = list(guards) if isinstance(guards, Sequence) else [guards]
    return [MonitorSample(g.policy.name, g.core.monitor.snapshot(), dict(labels or {})) for g in every]


def metrics_registry(guards: Any | Sequence[Any] | Callable[[], Sequence[MonitorSample]],
                     label_names: Sequence[str] = ()) -> Any:
    """A ``CollectorRegistry`` whose one collector reads, at each scrape, each guard's ``core.monitor`` (or the
    samples a callable returns; ``label_names`` are their extra labels, on every series)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    read = guards if callable(guards) and not hasattr(guards, "core") else (lambda: guard_samples(guards))
    extra = list(label_names)

    class MonitorCollector:
        def collect(self):
            decisions = CounterMetricFamily("memguard_decisions", "Decisions by action.",
                                            labels=[*extra, "policy", "action"])
            labels = [*extra, "policy", "rule", "metric", "calibration", "above_fpr"]
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
                                         labels=[*extra, "policy", "check"])
            for sample in read():
                policy = sample.policy
                snapshot = sample.snapshot
                own = [str(sample.labels.get(name, "")) for name in extra]
                for action, count in sorted(snapshot["actions"].items()):
                    decisions.add_metric([*own, policy, action], count)
                for row in snapshot["thresholds"]:
                    key = [*own, policy, row["rule"], row["metric"], row["calibration"], f"{row['above_fpr']:g}"]
                    judged.add_metric(key, row["decisions"])
                    crossed.add_metric(key, row["crossed"])
                    for bound in ("expected", "low", "high"):
                        name = "promised" if bound == "expected" else f"promised_{bound}"
                        promised.add_metric([*key, bound], row[name])
                    drift.add_metric(key, _DRIFT.get(row["verdict"] or "", 0.0))
                for check in ("caption_fit", "score_distribution"):
                    mismatch.add_metric([*own, policy, check], 1.0 if check in snapshot["problems"] else 0.0)
            yield from (decisions, judged, crossed, promised, drift, mismatch)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector())
    return registry


def add_metrics_route(app: Any, guard: Any | Sequence[Any],
                      gather: Callable[[], Awaitable[Sequence[MonitorSample]]] | None = None,
                      label_names: Sequence[str] = ()) -> bool:
    """Mount ``GET /metrics`` for ``guard`` (or several) on ``app`` when ``prometheus_client`` is installed; returns
    whether it was. With ``gather``, each scrape awaits it for the samples to serve (a replica answering for its
    deployment) instead of reading ``guard``."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    except ImportError:
        return False
    from fastapi.responses import Response

    if gather is None:
        registry = metrics_registry(guard)

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

        return True

    @app.get("/metrics", include_in_schema=False)
    async def gathered_metrics() -> Response:
        samples = list(await gather())
        return Response(generate_latest(metrics_registry(lambda: samples, label_names)), media_type=CONTENT_TYPE_LATEST)

    return True
