from collections.abc import Iterator
from pathlib import Path

import pytest

from castmesh.mesh.tls import self_signed
from tests.integration.harness import Up, free_port, start_up


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """`castmesh up`, with HTTPS too (a self-signed certificate made here) on https_port."""
    tmp = Path(tmp_path_factory.mktemp("up"))
    cert, key = self_signed(tmp)
    https = free_port()
    up = start_up(tmp, "--tls-cert", str(cert), "--tls-key", str(key), "--https-port", str(https))
    up.https_port = https
    yield up
    up.process.stop()
