"""The dashboard in Debian's headless Chromium, against a real worker.

Chromium and its WebDriver come from ``scripts/chromium.sh`` (run by
``scripts/test.sh``); selenium drives ``/usr/bin/chromium`` through
``/usr/bin/chromedriver``, so nothing is downloaded at run time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TIMEOUT_S = 60.0


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Return headless Chromium; fail in CI (skip locally) when it is missing."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        reason = f"{CHROMIUM} or {CHROMEDRIVER} missing: run scripts/chromium.sh"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def event(number: int, *, kind: str, camera: str, **extra: Any) -> bytes:
    inner = {"event_id": f"e{number}", "camera_id": camera, "label": "car"}
    inner["tracker_id"] = f"t{number % 3}"
    body = {
        "aggregated_id": f"{kind}:e{number}",
        "type": kind,
        "status": "open",
        "camera_id": camera,
        "label": "car",
        "start_time_ms": 1_700_000_000_000 + number,
        "event": inner,
        **extra,
    }
    return orjson.dumps(body)


def publish(bootstrap: str, topic: str, values: list[bytes]) -> None:
    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for value in values:
                await producer.send(topic, value=value, key=b"dashboard")
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())


def text_of(driver: webdriver.Chrome, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def wait_text(
    driver: webdriver.Chrome, element_id: str, check: Callable[[str], bool]
) -> None:
    WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.2).until(
        lambda d: check(text_of(d, element_id)),
        message=f"#{element_id} never passed; it shows {text_of(driver, element_id)!r}",
    )


def test_dashboard_shows_events_live_and_reconnects_after_a_restart(
    worker_factory: Callable[..., Any], kafka_bootstrap: str, browser: webdriver.Chrome
) -> None:
    worker = worker_factory()
    topic = worker.topic("aggregated-events")
    browser.get(f"{worker.url}/aggregator/dashboard/?token={worker.token}")
    wait_text(browser, "status", lambda text: text == "live")

    first = [event(n, kind="observation", camera=f"cam-{n % 3}") for n in range(20)]
    first += [
        event(100 + n, kind="correlated", camera=f"cam-{n}", global_id="g-7")
        for n in range(2)
    ]
    publish(kafka_bootstrap, topic, first)
    wait_text(browser, "total", lambda text: text == "22")
    cameras = text_of(browser, "cameras")
    assert "cam-0" in cameras and "car #t" in cameras
    assert "g-7" in text_of(browser, "correlated")
    assert "cam-0, cam-1" in text_of(browser, "correlated")
    assert "observation=20" in text_of(browser, "by-type")

    # The worker goes away and comes back; the page resumes where it was.
    worker.stop()
    wait_text(browser, "status", lambda text: text == "reconnecting")
    publish(kafka_bootstrap, topic, [event(200, kind="observation", camera="cam-9")])
    worker.restart()
    publish(kafka_bootstrap, topic, [event(201, kind="observation", camera="cam-9")])
    wait_text(browser, "total", lambda text: text == "24")
    wait_text(browser, "status", lambda text: text == "live")
    assert int(text_of(browser, "reconnects")) >= 1
    rows = browser.find_elements(By.CSS_SELECTOR, "#events tbody tr")
    ids = [row.get_attribute("data-id") for row in rows]
    assert len(ids) == len(set(ids)) == 24
