"""The Faust application: ``faust -A aggregator_app worker``.

Settings come from the environment (:mod:`aggregator_app.settings`), rules from
the rules file. Agents live in the ``agents`` package and tables in ``tables``;
both are found by autodiscovery when the worker starts.
"""

from __future__ import annotations

import logging

import faust

from aggregator_app import transport  # noqa: F401  # registers the batching transport
from aggregator_app.settings import load_settings
from rules.config import load_rules

__all__ = ["app", "rules", "settings"]

# aiokafka logs every record it sends at debug level; below info, that record
# is built (and dropped) for every send, a tenth of a busy worker's time.
logging.getLogger("aiokafka").setLevel(logging.INFO)

settings = load_settings()
rules = load_rules(settings.rules_path).with_topic_prefix(settings.topic_prefix)
(settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)

app = faust.App(
    settings.app_id,
    broker=settings.broker_url,
    store="rocksdb://",
    datadir=str(settings.data_dir / "faust"),
    autodiscover=["agents", "tables", "aggregator_app.web"],
    origin="aggregator_app",
    web_port=settings.web_port,
    web_bind="0.0.0.0",
    topic_partitions=rules.partitions,
    processing_guarantee=settings.guarantee,
    broker_max_poll_records=5000,
    stream_buffer_maxsize=20_000,
    stream_wait_empty=True,
    producer_linger=0.005,
    producer_max_batch_size=1000 * 1000,
    table_cleanup_interval=3600.0,
    # A crash reads again what was not committed: commit often (it is cheap),
    # so that little is read again.
    broker_commit_interval=0.5,
    # A topic created as the worker subscribes can be missing from the first
    # metadata; the group is rebalanced once a refresh shows it (default 5 min).
    consumer_metadata_max_age_ms=5000,
)
