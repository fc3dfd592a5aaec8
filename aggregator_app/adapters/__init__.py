"""Adapters from each producer's message format to the unified event fields."""

from __future__ import annotations

from typing import Final

from aggregator_app.adapters.base import Adapter, AdapterContext, JsonObject
from aggregator_app.adapters.deepstream import DeepStreamAdapter
from aggregator_app.adapters.dlstreamer import DLStreamerAdapter
from aggregator_app.adapters.frigate import FrigateAdapter
from aggregator_app.adapters.mot import MotAdapter
from aggregator_app.adapters.unified import UnifiedAdapter
from aggregator_app.exceptions import ConfigError

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterContext",
    "DLStreamerAdapter",
    "DeepStreamAdapter",
    "FrigateAdapter",
    "JsonObject",
    "MotAdapter",
    "UnifiedAdapter",
    "adapter_for",
]

ADAPTERS: Final[dict[str, Adapter]] = {
    adapter.name: adapter
    for adapter in (
        DeepStreamAdapter(),
        FrigateAdapter(),
        DLStreamerAdapter(),
        MotAdapter(),
        UnifiedAdapter(),
    )
}
"""One shared instance per adapter name; adapters keep no state."""


def adapter_for(name: str) -> Adapter:
    """Return the adapter registered under a source's ``adapter`` name.

    Raises:
        ConfigError: no adapter has that name.
    """
    try:
        return ADAPTERS[name]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ConfigError(f"no adapter named {name!r}; known: {known}") from None
