"""Who may call the web port: the token and the CORS origins."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from aggregator_app.access import Access, load_access
from aggregator_app.exceptions import ConfigError
from aggregator_app.settings import load_settings


def test_a_token_is_taken_from_the_header_or_the_query() -> None:
    access = Access(token="s3cret", cors_origins=())
    header = make_mocked_request(
        "GET", "/aggregator/tables/", headers={"Authorization": "Bearer s3cret"}
    )
    query = make_mocked_request("GET", "/aggregator/stream/events/?token=s3cret")
    wrong = make_mocked_request("GET", "/x/?token=s3cre")
    basic = make_mocked_request("GET", "/x/", headers={"Authorization": "Basic s3cret"})

    assert access.allows(header) and access.allows(query)
    assert not access.allows(wrong) and not access.allows(basic)
    assert Access(token=None, cors_origins=()).allows(wrong)


def test_only_listed_origins_are_allowed() -> None:
    access = Access(token=None, cors_origins=("http://a.example",))
    assert access.allowed_origin("http://a.example") == "http://a.example"
    assert access.allowed_origin("http://b.example") is None
    assert access.allowed_origin(None) is None
    assert (
        Access(token=None, cors_origins=("*",)).allowed_origin("http://b") == "http://b"
    )


def test_without_a_token_one_is_made_once_and_kept(tmp_path: Path) -> None:
    settings = load_settings({"AGGREGATOR_DATA_DIR": str(tmp_path)})
    made = load_access(settings).token
    again = load_access(settings).token

    assert made is not None and made == again
    assert (tmp_path / "api-token").read_text().strip() == made
    assert (tmp_path / "api-token").stat().st_mode & 0o777 == 0o600


def test_auth_can_only_be_turned_off_explicitly(tmp_path: Path) -> None:
    env = {"AGGREGATOR_AUTH": "off", "AGGREGATOR_DATA_DIR": str(tmp_path)}
    off = load_settings(env)
    assert load_access(off).token is None
    assert not (tmp_path / "api-token").exists()
    with pytest.raises(ConfigError):
        load_settings({"AGGREGATOR_AUTH": "maybe"})
    with pytest.raises(ConfigError):
        load_settings({"AGGREGATOR_CORS_ORIGINS": "a.example"})
