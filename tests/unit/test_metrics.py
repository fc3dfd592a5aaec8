"""The Prometheus text rendering of a worker's counters."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from aggregator_app.metrics import (
    Histogram,
    LabelledGauge,
    StageLatency,
    WorkerCounters,
    prometheus_text,
)


def test_counters_and_gauges_render_in_prometheus_text() -> None:
    data = WorkerCounters(received=5, accepted_messages=3, kept=2)
    data.reject("broken_json")
    data.reject("broken_json")

    text = prometheus_text(data, {"store_backlog_rows": 7.0})

    lines = text.splitlines()
    assert "aggregator_received_total 5" in lines
    assert "aggregator_kept_total 2" in lines
    assert "# TYPE aggregator_received_total counter" in lines
    assert 'aggregator_rejected_by_reason_total{reason="broken_json"} 2' in lines
    assert "aggregator_store_backlog_rows 7.0" in lines
    assert text.endswith("\n")


def test_histograms_render_cumulative_buckets_sum_and_count() -> None:
    latency = StageLatency()
    for value_s in (0.0004, 0.003, 0.003, 0.2, 20.0):
        latency.observe("ingest", value_s)

    text = prometheus_text(WorkerCounters(), {}, histograms=latency)

    lines = text.splitlines()
    metric = "aggregator_stage_latency_seconds"
    assert f"# TYPE {metric} histogram" in lines
    assert f'{metric}_bucket{{stage="ingest",le="0.0005"}} 1' in lines
    assert f'{metric}_bucket{{stage="ingest",le="0.005"}} 3' in lines
    assert f'{metric}_bucket{{stage="ingest",le="0.25"}} 4' in lines
    assert f'{metric}_bucket{{stage="ingest",le="10.0"}} 4' in lines
    assert f'{metric}_bucket{{stage="ingest",le="+Inf"}} 5' in lines
    assert f'{metric}_count{{stage="ingest"}} 5' in lines
    assert any(
        line.startswith(f'{metric}_sum{{stage="ingest"}} 20.20') for line in lines
    )


def test_duplicates_totals_and_labelled_gauges_render() -> None:
    data = WorkerCounters(repeats=3, redeliveries=4)
    lag = LabelledGauge(
        name="consumer_lag_by_partition",
        help="Lag.",
        values={(("topic", 'a"b'), ("partition", "0")): 5.0},
    )

    text = prometheus_text(
        data, {}, totals={"store_rows_written": ("Rows.", 9.0)}, labelled=[lag]
    )

    lines = text.splitlines()
    assert "aggregator_duplicates_removed_total 7" in lines
    assert "aggregator_store_rows_written_total 9.0" in lines
    assert (
        'aggregator_consumer_lag_by_partition{topic="a\\"b",partition="0"} 5.0' in lines
    )


@given(st.lists(st.floats(min_value=0, max_value=100), max_size=50))
def test_histogram_buckets_are_cumulative_and_end_at_the_count(
    values: list[float],
) -> None:
    histogram = Histogram()
    for value in values:
        histogram.observe(value)

    counts = [count for _, count in histogram.cumulative()]

    assert counts == sorted(counts)
    assert counts[-1] == len(values) == histogram.count
