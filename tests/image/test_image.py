"""The image, run the way the chart runs it: the migration hook Job, the worker pools, beat and
the simulator, each with the command line, environment and exec probes of its rendered
manifest, as uid 10001 in a container of the CI image (buildah, chroot isolation, the host's
network) against a fresh Postgres database and a RabbitMQ vhost of this run. Starts are
enqueued from the host with the producer API, as an application would.

`make image-test` builds the image (docker/ci-image.sh) and runs this module; see conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from orchestrator.config import load_settings
from orchestrator.db.migrate import alembic_config
from orchestrator.producer import Producer
from tests.image import buildah
from tests.image.chart import ContainerRun

pytestmark = [pytest.mark.postgres, pytest.mark.broker, pytest.mark.worker]

LONG_RUNNING = ("simulator", "worker", "control", "beat")


def wait_until(what: str, check: Callable[[], bool], timeout: float, stack: Stack) -> None:
    """Poll ``check``; fail with the containers' logs at the deadline, or at once when a
    container's command has exited that nobody stopped."""
    deadline = time.monotonic() + timeout
    while not check():
        crashed = stack.crashed()
        if crashed or time.monotonic() > deadline:
            reason = f"{', '.join(crashed)} exited" if crashed else f"not within {timeout:g} s"
            pytest.fail(f"{what}: did not happen ({reason})\n{stack.logs()}")
        time.sleep(0.5)


@dataclass
class Pod:
    """One role's container and the process the chart's command started in it."""

    role: str
    run: ContainerRun
    container: buildah.Container
    log: Path
    process: Any = None
    stopped: bool = False  # by the test: its exit is no crash

    def start(self) -> None:
        self.process = self.container.start(self.run.argv, self.run.env, self.log)
        self.stopped = False

    def stop(self) -> int:
        """SIGTERM, as the kubelet stops a container; the command's exit status."""
        self.stopped = True
        status: int = self.container.terminate(self.process, timeout=120)
        return status

    def probe(self, kind: str) -> int:
        """The chart's exec probe of this kind, run inside the container (as the kubelet
        execs it: the container's environment, its /tmp)."""
        return self.container.run(self.run.probes[kind], self.run.env, timeout=30).returncode

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.role} ({self.run.workload}) ---\n" + "\n".join(
            text.splitlines()[-lines:]
        )


@dataclass
class Stack:
    pods: dict[str, Pod]
    database_url: str
    broker_url: str
    simulator_url: str
    tmp: Path
    extra: list[Pod] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in [*self.pods.values(), *self.extra])

    def crashed(self) -> list[str]:
        return [
            p.role
            for p in [*self.pods.values(), *self.extra]
            if p.process is not None and p.process.poll() is not None and not p.stopped
        ]

    def producer(self) -> Producer:
        settings = load_settings(
            database_url=self.database_url, broker_url=self.broker_url, state_dir=self.tmp
        )
        return Producer(settings)

    def simulator(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.simulator_url}{path}", timeout=10) as response:
            return json.load(response)

    def rows(self, request_ids: list[str]) -> list[dict[str, Any]]:
        conninfo = make_url(self.database_url).set(drivername="postgresql")
        with psycopg.connect(conninfo.render_as_string(hide_password=False)) as conn:
            cursor = conn.execute(
                "SELECT request_id, status, vendor_session_id, end_reason, error_code"
                " FROM sessions WHERE request_id = ANY(%s)",
                (request_ids,),
            )
            names = [c.name for c in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def passes(pod: Pod, kind: str) -> Callable[[], bool]:
    return lambda: pod.probe(kind) == 0


def new_pod(role: str, run: ContainerRun, tmp: Path) -> Pod:
    container = buildah.Container.create(role)
    return Pod(role=role, run=run, container=container, log=tmp / f"{role}.log")


@pytest.fixture(scope="module")
def migration(runs: dict[str, ContainerRun]) -> subprocess.CompletedProcess[str]:
    """The migration hook Job's container, run to its end before anything else (as Helm's
    pre-install hook is)."""
    container = buildah.Container.create("migrate")
    try:
        return container.run(runs["migrate"].argv, runs["migrate"].env, timeout=120)
    finally:
        container.remove()


@pytest.fixture(scope="module")
def stack(
    runs: dict[str, ContainerRun],
    migration: subprocess.CompletedProcess[str],
    image_database_url: str,
    broker_url: str,
    simulator_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    assert migration.returncode == 0, migration.stdout + migration.stderr
    tmp = tmp_path_factory.mktemp("image")
    with ExitStack() as cleanup:
        pods = {}
        for role in LONG_RUNNING:
            pods[role] = new_pod(role, runs[role], tmp)
            cleanup.callback(pods[role].container.remove)
        result = Stack(
            pods=pods,
            database_url=image_database_url,
            broker_url=broker_url,
            simulator_url=f"http://127.0.0.1:{simulator_port}",
            tmp=tmp,
        )
        for pod in pods.values():
            pod.start()

        def simulator_up() -> bool:
            try:
                result.simulator("/_sim/stats")
            except OSError:
                return False
            return True

        wait_until("the simulator answering /_sim/stats", simulator_up, 60, result)
        for role in ("worker", "control", "beat"):
            wait_until(f"{role}'s startup probe passing", passes(pods[role], "startup"), 90, result)
        yield result


def test_the_migration_job_migrates_the_empty_database_to_head(
    migration: subprocess.CompletedProcess[str], image_database_url: str
) -> None:
    assert migration.returncode == 0, migration.stdout + migration.stderr
    conninfo = make_url(image_database_url).set(drivername="postgresql")
    with psycopg.connect(conninfo.render_as_string(hide_password=False)) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    head = ScriptDirectory.from_config(alembic_config(image_database_url)).get_current_head()
    assert row == (head,), f"the Job left the database at {row}, not {head}"


CODE_DIGESTS = """
import hashlib, pathlib, orchestrator
root = pathlib.Path(orchestrator.__file__).parent
for path in sorted(root.rglob("*.py")):
    print(path.relative_to(root), hashlib.sha256(path.read_bytes()).hexdigest())
"""


def test_the_image_holds_this_checkouts_code(image_config: dict[str, Any]) -> None:
    """Not an image from an older build: buildah's layer cache is keyed on the sources."""
    container = buildah.Container.create("code")
    try:
        result = container.run(["python", "-c", CODE_DIGESTS], {}, timeout=60)
    finally:
        container.remove()
    assert result.returncode == 0, result.stderr
    in_image = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    package = Path(__file__).resolve().parents[2] / "orchestrator"
    for path in sorted(package.rglob("*.py")):
        name = str(path.relative_to(package))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert in_image.get(name) == digest, f"orchestrator/{name} differs in {buildah.IMAGE}"


def test_the_chart_runs_the_image_under_test(runs: dict[str, ContainerRun]) -> None:
    assert set(runs) == {"migrate", *LONG_RUNNING}
    assert {run.image for run in runs.values()} == {buildah.IMAGE}
    for role in ("worker", "control", "beat"):
        assert runs[role].probes.keys() == {"startup", "liveness", "readiness"}, role


def test_a_start_goes_active_and_is_reaped(stack: Stack) -> None:
    producer = stack.producer()
    try:
        request_id = producer.enqueue_start_session(
            avatar_id="image-test", max_duration_seconds=3, request_id=f"img-{uuid.uuid4().hex}"
        )
        info = producer.wait_for_session(request_id, timeout=60)
        assert info.status == "active", f"{info!r}\n{stack.logs()}"
        assert info.livekit_url and info.livekit_token and info.session_id
        wait_until(
            "the reaper ending the session",
            lambda: producer.session_info(request_id).status == "ended",
            60,
            stack,
        )
        assert producer.session_info(request_id).end_reason == "MAX_DURATION_REACHED"
        vendor = stack.simulator(f"/_sim/sessions/{info.session_id}")
        assert vendor["status"] == "ended", vendor
    finally:
        producer.close()


def test_the_probes_pass_in_the_running_containers(stack: Stack) -> None:
    for role in ("worker", "control", "beat"):
        pod = stack.pods[role]
        for kind in ("liveness", "readiness"):
            assert pod.probe(kind) == 0, f"{role} {kind} probe failed\n{stack.logs()}"


def test_sigterm_with_starts_in_flight_loses_none(stack: Stack, tmp_path: Path) -> None:
    worker = stack.pods["worker"]
    before = {s["session_id"] for s in stack.simulator("/_sim/sessions")}
    producer = stack.producer()
    count = 16  # more than the pool's 8 threads: some wait in the queue or in admission
    try:
        request_ids = [
            producer.enqueue_start_session(
                avatar_id="image-test",
                max_duration_seconds=3,
                request_id=f"img-term-{i}-{uuid.uuid4().hex[:8]}",
            )
            for i in range(count)
        ]
        wait_until(
            "starts in flight at the vendor",
            lambda: sum(r["status"] == "starting" for r in stack.rows(request_ids)) >= 2,
            60,
            stack,
        )
        in_flight = [r["request_id"] for r in stack.rows(request_ids) if r["status"] == "starting"]
        status = worker.stop()
        assert status == 0, f"worker exited {status} after SIGTERM\n{stack.logs()}"

        # A stopped worker's probes fail once its heartbeat is older than the chart's limit.
        wait_until(
            "the stopped worker's liveness probe failing",
            lambda: worker.probe("liveness") != 0,
            40,
            stack,
        )
        assert worker.probe("readiness") != 0

        # The replacement pod (a new container, a fresh /tmp) picks up whatever was requeued.
        replacement = new_pod("worker-2", worker.run, tmp_path)
        stack.extra.append(replacement)
        try:
            replacement.start()

            def all_ended() -> bool:
                rows = stack.rows(request_ids)
                return len(rows) == count and all(r["status"] == "ended" for r in rows)

            wait_until("every request ending", all_ended, 120, stack)
            wait_until(
                "the replacement's readiness probe passing",
                passes(replacement, "readiness"),
                60,
                stack,
            )
        finally:
            replacement.container.remove()
    finally:
        producer.close()

    rows = stack.rows(request_ids)
    assert sorted(r["request_id"] for r in rows) == sorted(request_ids)
    assert {r["end_reason"] for r in rows} == {"MAX_DURATION_REACHED"}, rows
    assert in_flight, "no start was in flight at the SIGTERM"
    # Exactly one vendor session per request, and none left running (billing).
    sessions = [s for s in stack.simulator("/_sim/sessions") if s["session_id"] not in before]
    assert sorted(s["session_id"] for s in sessions) == sorted(
        r["vendor_session_id"] for r in rows
    ), f"{sessions}\n{rows}"
    assert not [s for s in sessions if s["status"] != "ended"], sessions


def test_nothing_is_written_outside_the_charts_mounts(stack: Stack) -> None:
    """Under the chart the root filesystem is read-only and only /tmp (an emptyDir) is
    writable; chroot isolation cannot make the root read-only, so check what uid 10001 wrote."""
    for pod in stack.pods.values():
        assert pod.container.files_written_outside(pod.run.writable) == [], pod.role
