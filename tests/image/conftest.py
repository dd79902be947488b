"""The image tests run only when asked for: `make image-test` (which builds the image first
and sets ORCHESTRATOR_IMAGE_TEST=1) or `pytest tests/image`. A plain `make pytest` leaves them
out, so it never runs an image older than the code. When asked for, a missing buildah or image
fails them; nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import APP_ID, USER_KEY, fresh_postgres_database
from tests.image import buildah
from tests.image.chart import ContainerRun, container_runs, render

HERE = Path(__file__).parent


def _requested(config: pytest.Config) -> bool:
    if os.environ.get("ORCHESTRATOR_IMAGE_TEST") == "1":
        return True
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name.startswith("test_") and not _requested(config):
        return True
    return None


@pytest.fixture(scope="session")
def image_config() -> dict[str, Any]:
    """The CI image's OCI config; fails (never skips) without buildah or the image."""
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed: apt-get install buildah debootstrap (.ci/run does)")
    try:
        return buildah.image_config()
    except RuntimeError as error:
        pytest.fail(f"no image {buildah.IMAGE} ({error}): build it with docker/ci-image.sh")


@pytest.fixture(scope="session")
def image_database_url() -> Iterator[str]:
    """A new, empty database: the chart's migration Job has to create the schema."""
    with fresh_postgres_database("orch_image") as url:
        yield url


@pytest.fixture(scope="session")
def simulator_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def chart_values(database_url: str, broker_url: str, simulator_port: int) -> dict[str, Any]:
    """The chart's values for this run: the CI image, the run's database and vhost, the
    simulator on a free port of the host's network, short intervals so a test sees a reap
    and a stale heartbeat in seconds."""
    image, _, tag = buildah.IMAGE.rpartition(":")
    return {
        "image": {"repository": image, "tag": tag, "pullPolicy": "Never"},
        "secrets": {
            "databaseUrl": database_url,
            "brokerUrl": broker_url,
            "deepbrainAppId": APP_ID,
            "deepbrainUserKey": USER_KEY,
        },
        "config": {
            "deepbrainBaseUrl": f"http://127.0.0.1:{simulator_port}",
            "logFormat": "text",
            "reaperIntervalSeconds": 1,
            "heartbeatMaxAgeSeconds": 15,
            "vendorTimeoutSeconds": 10,
            "orphanGraceSeconds": 20,
        },
        "worker": {"concurrency": 8},
        # Every vendor call takes a second, so a SIGTERM finds starts in flight.
        "simulator": {
            "enabled": True,
            "latencySeconds": 1,
            "extraArgs": ["--port", str(simulator_port)],
        },
    }


@pytest.fixture(scope="session")
def runs(
    image_config: dict[str, Any], image_database_url: str, broker_url: str, simulator_port: int
) -> dict[str, ContainerRun]:
    """Each container the chart renders, with the image's ENTRYPOINT/CMD applied."""
    values = chart_values(image_database_url, broker_url, simulator_port)
    return container_runs(
        render(values), image_config.get("Entrypoint") or [], image_config.get("Cmd") or []
    )
