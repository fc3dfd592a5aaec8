"""The Prometheus text rendering of a worker's counters."""

from __future__ import annotations

from aggregator_app.metrics import WorkerCounters, prometheus_text


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
