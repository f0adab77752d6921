"""Fixtures for the container tests: the engine, and the image built once per session."""

from __future__ import annotations

import os

import pytest

from ._engine import HOW_TO_RUN, IMAGE, ROOT, Built, Engine, find_engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    found = find_engine()
    if found is None:
        if os.environ.get("NORMSERVE_REQUIRE_CONTAINER"):  # set by .ci/container: no silent skip
            pytest.fail(HOW_TO_RUN)
        pytest.skip(HOW_TO_RUN)
    return found


@pytest.fixture(scope="session")
def image(engine: Engine) -> Built:
    output, seconds = engine.build(ROOT, IMAGE)
    return Built(IMAGE, seconds, engine.size(IMAGE), output)
