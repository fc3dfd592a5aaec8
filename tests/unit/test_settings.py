"""Settings from the environment: defaults, and values refused with a reason."""

from __future__ import annotations

import pytest

from aggregator_app.exceptions import ConfigError
from aggregator_app.settings import load_settings


def test_defaults_need_no_environment() -> None:
    settings = load_settings({})

    assert settings.guarantee == "at_least_once"
    assert settings.web_port == 8014


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_most_once", ""])
def test_a_guarantee_the_worker_cannot_keep_is_refused(guarantee: str) -> None:
    with pytest.raises(ConfigError, match="AGGREGATOR_GUARANTEE"):
        load_settings({"AGGREGATOR_GUARANTEE": guarantee})
