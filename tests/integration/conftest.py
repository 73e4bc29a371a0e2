from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Up, start_up


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = start_up(Path(tmp_path_factory.mktemp("up")))
    yield up
    up.process.stop()
