"""The rules file (``config/aggregation-rules.yml``), validated when it is loaded.

The file declares the detector sources (topic and adapter), the ingest limits,
the deduplication rule, the action rules (pairs of detectors, sequences) and
the metadata used for enrichment (sites, zones, cameras). Durations are given
in the file with their unit in the name (``window_s``) and kept in that unit
here; nothing downstream converts them again. A file that does not validate
stops the worker at start with a
:class:`~aggregator_app.exceptions.ConfigError` naming the offending field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aggregator_app.exceptions import ConfigError

__all__ = [
    "ActionRules",
    "CameraInfo",
    "CorrelationOverrides",
    "CorrelationRule",
    "DedupRule",
    "EpisodeRule",
    "EventMatch",
    "IngestLimits",
    "PairRule",
    "RulesConfig",
    "SequenceRule",
    "SiteInfo",
    "SourceConfig",
    "load_rules",
]

AdapterName = Literal["deepstream", "frigate", "dlstreamer", "mot", "unified"]
TopicName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,200}$")]
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceConfig(_Strict):
    """One detector topic and the adapter that reads its messages."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    topic: TopicName
    adapter: AdapterName
    site_id: str | None = None
    detector: str | None = Field(
        default=None, description="detector kind when the payload does not say"
    )


class IngestLimits(_Strict):
    """What an input message must satisfy to be accepted."""

    max_payload_bytes: Annotated[int, Field(gt=0)] = 256 * 1024
    max_clock_skew_s: PositiveSeconds = 300.0
    naive_timestamps: Literal["utc", "reject"] = "utc"
    allow_unknown_cameras: bool = False


class DedupRule(_Strict):
    """When a detector event repeats an earlier one."""

    rule_id: str = "dedup-5s"
    window_s: PositiveSeconds = 5.0
    grace_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 10.0
    cell_size: Annotated[float, Field(gt=0, le=1)] = 0.05
    cell_size_m: PositiveSeconds = 1.0
    max_absorbed_ids: Annotated[int, Field(ge=0)] = 1000
    close_after_idle_s: PositiveSeconds = 10.0
    #: How far ahead of the worker's clock an event may move the watermark.
    watermark_max_lead_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0


class EventMatch(_Strict):
    """Which detector events play a part in an action rule; every field given must hold.

    ``attribute`` names an attribute the event must carry with a value that
    is not null (a face's ``identity``).
    """

    detector: Literal["person", "object", "vehicle", "face", "gesture"] | None = None
    label: str | None = None
    zone_id: str | None = None
    attribute: str | None = None


RuleId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
NonNegativeSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class PairRule(_Strict):
    """Two detectors seeing one thing at once: ``anchor`` and ``partner`` (any order).

    An ``anchor`` event and a ``partner`` event of the same camera, at most
    ``within_s`` apart in event time, with boxes overlapping by at least
    ``min_overlap`` (``iou``: intersection over union; ``min_ratio``:
    intersection over the smaller box), become one action. Each anchor
    takes at most one partner and each partner serves at most one anchor
    (see ``docs/event-patterns.md`` for which one).
    """

    kind: Literal["pair"]
    id: RuleId
    action: str = Field(description="label of the action events, e.g. greeting")
    anchor: EventMatch
    partner: EventMatch
    within_s: PositiveSeconds
    overlap: Literal["iou", "min_ratio"] = "iou"
    min_overlap: Annotated[float, Field(gt=0, le=1)] = 0.1


class SequenceRule(_Strict):
    """``first`` then ``then`` within ``within_s``, with no ``unless`` in between.

    The events must share the camera and, with ``same: tracker_id`` (the
    default), the tracker id: one tracked thing goes from ``first`` to
    ``then``.
    """

    kind: Literal["sequence"]
    id: RuleId
    action: str
    first: EventMatch
    then: EventMatch
    unless: EventMatch | None = None
    within_s: PositiveSeconds
    same: Literal["tracker_id", "camera"] = "tracker_id"


class ActionRules(_Strict):
    """Cross-detector actions: rules that turn several events into one.

    ``grace_s`` is how much older than the partition's watermark (event
    time) an event may be and still take part; decisions wait for it.
    ``retain_s`` is how long (event time) decided actions are remembered
    after their last possible member, so that events read again after a
    restart recognise them.
    """

    grace_s: NonNegativeSeconds = 5.0
    retain_s: NonNegativeSeconds = 60.0
    close_after_idle_s: PositiveSeconds = 10.0
    rules: list[Annotated[PairRule | SequenceRule, Field(discriminator="kind")]] = (
        Field(default_factory=list)
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> ActionRules:
        _require_unique("action rule id", [rule.id for rule in self.rules])
        return self


class EpisodeRule(_Strict):
    """Temporal fusion of one global object's observations into episodes.

    Observations are held in hopping windows of ``size_s`` every ``step_s``
    (``size_s`` a multiple of ``step_s``); an episode ends when the object
    has been quiet for ``gap_s`` of event time.
    """

    size_s: PositiveSeconds = 30.0
    step_s: PositiveSeconds = 10.0
    gap_s: PositiveSeconds = 15.0
    grace_s: NonNegativeSeconds = 5.0
    path_min_distance_m: NonNegativeSeconds = 0.5
    path_max_points: Annotated[int, Field(ge=2, le=10_000)] = 50

    @model_validator(mode="after")
    def _windows_fit(self) -> EpisodeRule:
        panes = self.size_s / self.step_s
        if panes < 1 or abs(panes - round(panes)) > 1e-9:
            raise ValueError("size_s must be a whole multiple of step_s")
        return self


Metres = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Homography = tuple[
    tuple[float, float, float],
    tuple[float, float, float],
    tuple[float, float, float],
]


class CorrelationOverrides(_Strict):
    """Distances and times of one site, where they differ (people, not cars)."""

    max_gap_s: PositiveSeconds | None = None
    same_camera_gate_m: Metres | None = None
    cross_camera_gate_m: Metres | None = None
    merge_gate_m: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    gate_growth_mps: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    same_frame_merge_m: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    min_velocity_dt_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class CorrelationRule(_Strict):
    """When events of several cameras (or repeats of one) are one object.

    See :mod:`aggregator_app.correlate` for how these are used.
    """

    enabled: bool = True
    rule_id: str = "correlate"
    late_events_topic: TopicName = "late-events"
    grace_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    idle_camera_after_s: PositiveSeconds = 5.0
    max_gap_s: PositiveSeconds = 3.0
    close_after_s: PositiveSeconds = 10.0
    same_camera_gate_m: Metres = 6.0
    cross_camera_gate_m: Metres = 8.0
    merge_gate_m: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 3.0
    gate_growth_mps: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    same_frame_merge_m: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 2.5
    max_speed_mps: Metres = 20.0
    velocity_smoothing: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_velocity_dt_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.2
    max_member_ids: Annotated[int, Field(ge=0)] = 100
    max_remembered_late: Annotated[int, Field(ge=0)] = 10_000
    must_not_link: dict[str, list[str]] = Field(
        default_factory=dict,
        description="camera id -> cameras whose events never share a global id",
    )
    homographies: dict[str, Homography] = Field(
        default_factory=dict,
        description="camera id -> 3x3 matrix, image pixels (foot point) -> metres",
    )
    zone_adjacency: dict[str, list[str]] = Field(default_factory=dict)
    site_overrides: dict[str, CorrelationOverrides] = Field(
        default_factory=dict,
        description="site id -> distances and times that differ there",
    )

    def for_site(self, site_id: str) -> CorrelationRule:
        """Return the rule in force at a site: its overrides over the rest."""
        overrides = self.site_overrides.get(site_id)
        if overrides is None:
            return self
        return self.model_copy(update=overrides.model_dump(exclude_none=True))

    @model_validator(mode="after")
    def _no_self_links(self) -> CorrelationRule:
        for camera_id, others in self.must_not_link.items():
            if camera_id in others:
                raise ValueError(f"camera {camera_id!r} must-not-link with itself")
        return self

    def must_not_link_map(self) -> dict[str, frozenset[str]]:
        """Return the must-not-link pairs both ways: camera -> cameras."""
        links: dict[str, set[str]] = {}
        for camera_id, others in self.must_not_link.items():
            for other in others:
                links.setdefault(camera_id, set()).add(other)
                links.setdefault(other, set()).add(camera_id)
        return {camera_id: frozenset(others) for camera_id, others in links.items()}


class CameraInfo(_Strict):
    """What is known about one camera; used to accept and enrich its events."""

    site_id: str
    zone_id: str | None = None
    frame_width_px: Annotated[int, Field(gt=0)] | None = None
    frame_height_px: Annotated[int, Field(gt=0)] | None = None


class SiteInfo(_Strict):
    """A site, and the pattern that its camera ids follow."""

    name: str
    camera_id_pattern: str | None = None
    frame_width_px: Annotated[int, Field(gt=0)] | None = None
    frame_height_px: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _pattern_compiles(self) -> SiteInfo:
        if self.camera_id_pattern is not None:
            try:
                re.compile(self.camera_id_pattern)
            except re.error as exc:
                raise ValueError(f"camera_id_pattern does not compile: {exc}") from exc
        return self


class RulesConfig(_Strict):
    """The whole rules file."""

    version: Literal[1]
    partitions: Annotated[int, Field(ge=1, le=256)] = 4
    aggregated_topic: TopicName = "aggregated-events"
    dead_letter_topic: TopicName = "dead-letters"
    ingest: IngestLimits = IngestLimits()
    sources: Annotated[list[SourceConfig], Field(min_length=1)]
    dedup: DedupRule = DedupRule()
    actions: ActionRules = Field(default_factory=ActionRules)
    episodes: EpisodeRule = Field(default_factory=EpisodeRule)
    correlation: CorrelationRule = CorrelationRule()
    sites: dict[str, SiteInfo] = Field(default_factory=dict)
    cameras: dict[str, CameraInfo] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> RulesConfig:
        _require_unique("source name", [source.name for source in self.sources])
        _require_unique("source topic", [source.topic for source in self.sources])
        for camera_id, camera in self.cameras.items():
            if camera.site_id not in self.sites:
                raise ValueError(f"camera {camera_id!r} names unknown site")
        for source in self.sources:
            if source.site_id is not None and source.site_id not in self.sites:
                raise ValueError(f"source {source.name!r} names unknown site")
        return self

    def with_topic_prefix(self, prefix: str) -> RulesConfig:
        """Return these rules with ``prefix`` put before every topic name.

        Tests and demo runs use it to get topics of their own on a shared broker.
        """
        if not prefix:
            return self
        sources = [
            source.model_copy(update={"topic": prefix + source.topic})
            for source in self.sources
        ]
        return self.model_copy(
            update={
                "sources": sources,
                "aggregated_topic": prefix + self.aggregated_topic,
                "dead_letter_topic": prefix + self.dead_letter_topic,
                "correlation": self.correlation.model_copy(
                    update={
                        "late_events_topic": prefix + self.correlation.late_events_topic
                    }
                ),
            }
        )

    def camera(self, camera_id: str) -> CameraInfo | None:
        """Return what is known of a camera, by its id or its site's pattern."""
        known = self.cameras.get(camera_id)
        if known is not None:
            return known
        for site_id, site in self.sites.items():
            pattern = site.camera_id_pattern
            if pattern is not None and re.fullmatch(pattern, camera_id):
                return CameraInfo(
                    site_id=site_id,
                    frame_width_px=site.frame_width_px,
                    frame_height_px=site.frame_height_px,
                )
        return None


def _require_unique(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} is declared twice")
        seen.add(value)


def load_rules(path: str | Path) -> RulesConfig:
    """Read and validate a rules file.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or does not validate.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read rules file {path}: {exc}") from exc
    try:
        return RulesConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid rules file {path}:\n{exc}") from exc
