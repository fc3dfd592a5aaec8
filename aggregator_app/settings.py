"""Settings of a worker, read once from the environment.

- ``KAFKA_BOOTSTRAP``: bootstrap servers, ``host:port[,host:port]``
  (``localhost:9092``).
- ``CLICKHOUSE_URL``: ``clickhouse://host:port/db`` for a server,
  ``chdb:///dir`` embedded (embedded in ``<data dir>/chdb``).
- ``AGGREGATOR_RULES``: the rules file (``config/aggregation-rules.yml``).
- ``AGGREGATOR_DATA_DIR``: tables, embedded store and spool (``.var``).
- ``AGGREGATOR_APP_ID``: consumer group, prefix of internal topics
  (``aggregator``).
- ``AGGREGATOR_TOPIC_PREFIX``: put before every topic of the rules file.
- ``AGGREGATOR_WEB_PORT``: the Faust web port (``8014``).
- ``AGGREGATOR_GUARANTEE``: ``at_least_once`` (the default, and the only one
  supported; ``exactly_once``, Kafka transactions, is refused for now).
- ``AGGREGATOR_STORE_FLUSH_MS``: longest a row waits in the store writer's
  buffer (``250``).
- ``AGGREGATOR_STORE_COMMIT_WAIT_MS``: how long an offset commit waits for the
  rows of the committed events to be stored before it spools them (``2000``).
- ``AGGREGATOR_RETENTION_DAYS``: days the store keeps a row (``30``).
- ``AGGREGATOR_RETENTION_INTERVAL_S``: how often a worker drops expired
  partitions (``3600``).
- ``AGGREGATOR_READY_MAX_LAG``: most records behind the partitions' ends for
  ``/health`` to say ready (``100000``).
- ``AGGREGATOR_AUTH``: ``on`` (default) or ``off``: whether the stream and
  table-query endpoints ask for a token.
- ``AGGREGATOR_API_TOKEN``: the token they ask for; with auth on and no token,
  the worker makes one and keeps it in ``<data dir>/api-token``.
- ``AGGREGATOR_CORS_ORIGINS``: browser origins allowed to call the web port,
  comma-separated (none by default).
- ``AGGREGATOR_STREAM_HEARTBEAT_MS``: how often an idle live stream gets a
  heartbeat (``15000``).
- ``AGGREGATOR_STREAM_QUEUE_EVENTS``: events a live-stream client may have
  waiting before it is dropped as too slow (``1000``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from aggregator_app.exceptions import ConfigError

__all__ = ["Settings", "load_settings"]

_REPO_ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_RULES = _REPO_ROOT / "config" / "aggregation-rules.yml"


@dataclass(frozen=True, slots=True)
class Settings:
    """What one worker is configured with."""

    kafka_bootstrap: str
    clickhouse_url: str | None
    rules_path: Path
    data_dir: Path
    app_id: str
    topic_prefix: str
    web_port: int
    guarantee: str
    store_flush_ms: int = 250
    store_commit_wait_ms: int = 2000
    retention_days: int = 30
    retention_interval_s: int = 3600
    ready_max_lag: int = 100_000
    auth: bool = True
    api_token: str | None = None
    cors_origins: tuple[str, ...] = ()
    stream_heartbeat_ms: int = 15_000
    stream_queue_events: int = 1000

    @property
    def broker_url(self) -> str:
        """Return the bootstrap servers in faust's URL form.

        The scheme picks the transport that delivers batches to the agents
        (:mod:`aggregator_app.transport`).
        """
        return ";".join(
            f"kafka+batches://{server.strip()}"
            for server in self.kafka_bootstrap.split(",")
        )


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read the settings from ``env`` (the process environment by default).

    Raises:
        ConfigError: a value cannot be used.
    """
    env = dict(os.environ) if env is None else env
    guarantee = env.get("AGGREGATOR_GUARANTEE", "at_least_once")
    if guarantee == "exactly_once":
        # TODO: Kafka transactions do not cover the idle ticks, the batched
        # outbox or the store's commit barrier yet; the mark goes, and this
        # refusal with it, when the restart tests pass with exactly_once.
        raise ConfigError(
            "AGGREGATOR_GUARANTEE=exactly_once is not supported yet: run "
            "at_least_once; every output carries a stable id (see README, "
            "Delivery guarantees)"
        )
    if guarantee != "at_least_once":
        raise ConfigError(
            f"AGGREGATOR_GUARANTEE must be at_least_once, not {guarantee!r}"
        )

    return Settings(
        kafka_bootstrap=env.get("KAFKA_BOOTSTRAP", "localhost:9092"),
        clickhouse_url=env.get("CLICKHOUSE_URL") or None,
        rules_path=_path(env, "AGGREGATOR_RULES", _DEFAULT_RULES),
        data_dir=_path(env, "AGGREGATOR_DATA_DIR", _REPO_ROOT / ".var"),
        app_id=env.get("AGGREGATOR_APP_ID", "aggregator"),
        topic_prefix=env.get("AGGREGATOR_TOPIC_PREFIX", ""),
        web_port=_int(env, "AGGREGATOR_WEB_PORT", 8014),
        guarantee=guarantee,
        store_flush_ms=_int(env, "AGGREGATOR_STORE_FLUSH_MS", 250),
        store_commit_wait_ms=_int(env, "AGGREGATOR_STORE_COMMIT_WAIT_MS", 2000),
        retention_days=_int(env, "AGGREGATOR_RETENTION_DAYS", 30),
        retention_interval_s=_int(env, "AGGREGATOR_RETENTION_INTERVAL_S", 3600),
        ready_max_lag=_int(env, "AGGREGATOR_READY_MAX_LAG", 100_000),
        auth=_on_off(env, "AGGREGATOR_AUTH", default=True),
        api_token=env.get("AGGREGATOR_API_TOKEN") or None,
        cors_origins=_origins(env.get("AGGREGATOR_CORS_ORIGINS", "")),
        stream_heartbeat_ms=_int(env, "AGGREGATOR_STREAM_HEARTBEAT_MS", 15_000),
        stream_queue_events=_int(env, "AGGREGATOR_STREAM_QUEUE_EVENTS", 1000),
    )


def _on_off(env: dict[str, str], name: str, *, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be on or off, not {value!r}")


def _origins(value: str) -> tuple[str, ...]:
    """Return the origins of a comma-separated list, without trailing slashes."""
    origins = tuple(part.strip().rstrip("/") for part in value.split(","))
    for origin in origins:
        if origin and origin != "*" and "://" not in origin:
            raise ConfigError(
                f"AGGREGATOR_CORS_ORIGINS: {origin!r} is not an origin "
                "(scheme://host[:port])"
            )
    return tuple(origin for origin in origins if origin)


def _path(env: dict[str, str], name: str, default: Path) -> Path:
    value = env.get(name)
    return Path(value).expanduser().resolve() if value else default


def _int(env: dict[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a whole number, not {value!r}") from exc
    if number <= 0:
        raise ConfigError(f"{name} must be positive, not {number}")
    return number
