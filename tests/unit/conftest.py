"""Guards of the unit layer: a warning is an error, and no test leaves a thread.

The integration layer runs faust and its libraries, whose own deprecation
warnings are not ours to fail on; here, every warning comes from our code or
from how it calls a library, and is fixed rather than tolerated.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

_UNIT_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _UNIT_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.filterwarnings("error"))


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    before = set(threading.enumerate())

    yield

    left = [
        thread
        for thread in threading.enumerate()
        if thread not in before and thread.is_alive() and not thread.daemon
    ]
    assert not left, f"test left threads running: {[t.name for t in left]}"
