"""Counters of one worker, kept in memory and logged and served over the web port.

Besides the counters: latency histograms by stage (:data:`latency`), filled
by the agents (a batch at a time) and by the store writer, and the text
format Prometheus scrapes (:func:`prometheus_text`). The format is written
here rather than with ``prometheus_client``: a worker serves one small page of
counters, gauges and histograms that already live in these objects, and a
second registry would have to be kept in step with them.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "LATENCY_BUCKETS_S",
    "Histogram",
    "LabelledGauge",
    "StageLatency",
    "WorkerCounters",
    "counters",
    "latency",
    "prometheus_text",
]

logger = logging.getLogger(__name__)


@dataclass
class WorkerCounters:
    """What one worker has seen since it started.

    ``received == accepted_messages + rejected`` always holds; one accepted
    message may yield several events (``accepted_events``).
    """

    received: int = 0
    accepted_messages: int = 0
    accepted_events: int = 0
    rejected: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    kept: int = 0
    repeats: int = 0
    redeliveries: int = 0
    reprocessed: int = 0
    late: int = 0
    published_open: int = 0
    published_closed: int = 0
    actions_published: int = 0
    actions_late: int = 0
    correlated_open: int = 0
    correlated_closed: int = 0
    correlation_late: int = 0
    episodes_published: int = 0

    def reject(self, reason: str) -> None:
        """Count one rejected message."""
        self.rejected += 1
        self.rejected_by_reason[reason] += 1

    def as_dict(self) -> dict[str, object]:
        """Return the counters as a JSON-ready dict."""
        data: dict[str, object] = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name != "rejected_by_reason"
        }
        data["rejected_by_reason"] = dict(self.rejected_by_reason)
        return data

    def log(self) -> None:
        """Log the counters at INFO level."""
        logger.info(
            "counts: received=%d accepted=%d rejected=%d kept=%d repeats=%d "
            "redeliveries=%d late=%d published_open=%d published_closed=%d",
            self.received,
            self.accepted_messages,
            self.rejected,
            self.kept,
            self.repeats,
            self.redeliveries,
            self.late,
            self.published_open,
            self.published_closed,
        )


counters = WorkerCounters()

_COUNTER_HELP = {
    "received": "Records read from detector topics.",
    "accepted_messages": "Records turned into events.",
    "accepted_events": "Events accepted (a record may hold several).",
    "rejected": "Records sent to the dead-letter topic.",
    "kept": "Events kept by deduplication.",
    "repeats": "Events absorbed as repeats.",
    "redeliveries": "Events absorbed as redeliveries.",
    "reprocessed": "Kept events read again after a restart.",
    "late": "Events older than the watermark by more than the grace period.",
    "published_open": "Open observations published.",
    "published_closed": "Closed observations published.",
    "actions_published": "Action events published (again after a restart too).",
    "actions_late": "Events too late (watermark - grace) to join an action.",
    "correlated_open": "Global objects made (correlated events, open).",
    "correlated_closed": "Global objects closed (correlated events, closed).",
    "correlation_late": "Events behind their site's watermark, sent to late-events.",
    "episodes_published": "Episodes (temporal fusion) published.",
}


#: Upper bounds of the latency buckets, seconds (``+Inf`` is added).
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Observations counted in cumulative buckets, with their sum and count.

    Not locked: observe it from one thread (the event loop, or the store
    writer's thread for its own stage); a scrape may see a count one behind.
    """

    def __init__(self, buckets_s: Iterable[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds_s = tuple(sorted(buckets_s))
        self.bucket_counts = [0] * (len(self.bounds_s) + 1)
        self.sum_s = 0.0
        self.count = 0

    def observe(self, value_s: float, count: int = 1) -> None:
        """Count ``count`` observations of ``value_s`` seconds each."""
        self.bucket_counts[bisect.bisect_left(self.bounds_s, value_s)] += count
        self.sum_s += value_s * count
        self.count += count

    def cumulative(self) -> list[tuple[str, int]]:
        """Return ``(le, count)`` pairs as Prometheus lists them, ``+Inf`` last."""
        pairs: list[tuple[str, int]] = []
        running = 0
        for bound_s, count in zip(self.bounds_s, self.bucket_counts, strict=False):
            running += count
            pairs.append((repr(bound_s), running))
        pairs.append(("+Inf", self.count))
        return pairs


class StageLatency:
    """One histogram per stage of the pipeline, made on first use.

    Stages: ``ingest`` and ``dedup`` (a record through its agent: the time
    its fetched batch took, counted once per record), ``ingest_to_publish``
    and ``dedup_to_publish`` (from the batch taken in hand until the broker
    has every record it produced, observations among them),
    ``store_write`` (one INSERT batch) and ``commit_wait`` (how long an
    offset commit waited for the store).
    """

    def __init__(self) -> None:
        self.stages: dict[str, Histogram] = {}

    def observe(self, stage: str, value_s: float, count: int = 1) -> None:
        """Count ``count`` observations of ``value_s`` seconds in ``stage``."""
        histogram = self.stages.get(stage)
        if histogram is None:
            histogram = self.stages[stage] = Histogram()
        histogram.observe(value_s, count)


latency = StageLatency()


@dataclass(frozen=True, slots=True)
class LabelledGauge:
    """A gauge with one value per label set, e.g. lag per topic and partition."""

    name: str
    help: str
    values: Mapping[tuple[tuple[str, str], ...], float]


def prometheus_text(
    data: WorkerCounters,
    gauges: dict[str, float],
    *,
    totals: Mapping[str, tuple[str, float]] | None = None,
    labelled: Iterable[LabelledGauge] = (),
    histograms: StageLatency | None = None,
) -> str:
    """Return the counters, ``gauges`` and the rest in Prometheus' text format.

    Counter names get the prefix ``aggregator_`` and the suffix ``_total``;
    rejects are one counter with a ``reason`` label. ``totals`` are further
    counters (name to help and value); ``histograms`` become
    ``aggregator_stage_latency_seconds`` with a ``stage`` label.
    """
    lines: list[str] = []
    for name, help_text in _COUNTER_HELP.items():
        _counter(lines, name, help_text, getattr(data, name))
    _counter(
        lines,
        "duplicates_removed",
        "Events absorbed as repeats or redeliveries.",
        data.repeats + data.redeliveries,
    )
    for name, (help_text, value) in (totals or {}).items():
        _counter(lines, name, help_text, value)

    metric = "aggregator_rejected_by_reason_total"
    lines += [
        f"# HELP {metric} Rejected records by reason.",
        f"# TYPE {metric} counter",
    ]
    for reason, count in sorted(data.rejected_by_reason.items()):
        lines.append(f'{metric}{{reason="{reason}"}} {count}')

    for name, value in gauges.items():
        lines += [f"# TYPE aggregator_{name} gauge", f"aggregator_{name} {value}"]
    for gauge in labelled:
        _labelled_gauge(lines, gauge)
    if histograms is not None:
        _histograms(lines, histograms)
    return "\n".join(lines) + "\n"


def _counter(lines: list[str], name: str, help_text: str, value: float) -> None:
    metric = f"aggregator_{name}_total"
    lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
    lines.append(f"{metric} {value}")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    text = ",".join(f'{name}="{_escaped(value)}"' for name, value in pairs)
    return f"{{{text}}}" if text else ""


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labelled_gauge(lines: list[str], gauge: LabelledGauge) -> None:
    metric = f"aggregator_{gauge.name}"
    lines += [f"# HELP {metric} {gauge.help}", f"# TYPE {metric} gauge"]
    for labels, value in sorted(gauge.values.items()):
        lines.append(f"{metric}{_labels(labels)} {value}")


def _histograms(lines: list[str], latency: StageLatency) -> None:
    metric = "aggregator_stage_latency_seconds"
    lines += [
        f"# HELP {metric} Time spent per stage of the pipeline.",
        f"# TYPE {metric} histogram",
    ]
    for stage, histogram in sorted(latency.stages.items()):
        for le, count in histogram.cumulative():
            labels = _labels((("stage", stage), ("le", le)))
            lines.append(f"{metric}_bucket{labels} {count}")
        lines.append(f'{metric}_sum{{stage="{stage}"}} {histogram.sum_s}')
        lines.append(f'{metric}_count{{stage="{stage}"}} {histogram.count}')
