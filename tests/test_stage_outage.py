"""A stage worker waits out a store outage and ends with the embedded default's results.

`vigil run --stage cases` consumes a FHIR topic on librdkafka's mock cluster (a real Kafka-protocol server) into a
throwaway PostgreSQL cluster of its own (tests/test_store_outage.py's ``DedicatedPostgres``), which is crashed with
``pg_ctl stop -m immediate`` once a third of the feed is stored and started again two seconds later. The worker must
wait, leave its group, rejoin from the store and finish; then `--stage monitor` runs; the store must hold exactly what
the embedded pipeline stores for the same feed.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import orjson
import pytest
from kafka_mock import quick_mock_cluster  # noqa: F401  (fixture)
from test_stages import _outcome, _stored_offsets
from test_store_outage import DedicatedPostgres

from vigil.keyed_feed import in_arrival_order, route
from vigil.persist import persist
from vigil.pipeline import Pipeline
from vigil.settings import load_settings
from vigil.simulator import simulate
from vigil.stages import StageWorker
from vigil.store import upgrade

PARTITIONS = 4


@pytest.fixture
def postgres():
    cluster = DedicatedPostgres()
    try:
        yield cluster
    finally:
        cluster.close()


def test_a_stage_worker_waits_out_a_store_crash_and_ends_with_the_embedded_results(postgres, quick_mock_cluster,
                                                                                  tmp_path):
    simulate("scanner-upgrade", tmp_path / "feed", seed=3, days=40, change_day=20, volume=0.2)
    resources = in_arrival_order(orjson.loads(line) for path in sorted((tmp_path / "feed").glob("*.ndjson"))
                                 for line in path.read_bytes().splitlines())
    (tmp_path / "feed.ndjson").write_bytes(b"\n".join(orjson.dumps(r) for r in resources))
    reference = f"sqlite:///{tmp_path / 'embedded.db'}"
    persist(Pipeline(load_settings()).run_paths([tmp_path / "feed.ndjson"]), load_settings(store_url=reference),
            ["feed"], datetime.now(UTC))

    url = postgres.database("stages")
    upgrade(url)
    quick_mock_cluster.create_topic("fhir", PARTITIONS)
    records = list(route(resources, PARTITIONS))
    quick_mock_cluster.produce("fhir", records)
    source = {"kind": "kafka", "name": "fhir", "bootstrap_servers": quick_mock_cluster.bootstrap, "topics": ["fhir"],
              "group_id": "vigil-cases", "api_version": "2.3", "idle_timeout_s": 1.0}
    settings = load_settings(store_url=url, sources=[source],
                             store_retry={"initial_s": 0.2, "max_s": 1.0, "give_up_after_s": 120})
    cases = StageWorker(settings, "cases", commit_every=0.2, max_batch=500)
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            cases.run(once=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 120
    while _stored_offsets(url) < len(records) // 3 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    stored_at_crash = _stored_offsets(url)
    postgres.stop()
    time.sleep(2.0)
    postgres.start()
    thread.join(timeout=180)
    assert not thread.is_alive() and not failure, failure
    assert len(records) // 3 <= stored_at_crash < len(records), "the crash must land mid-run"
    assert cases.report.outages >= 1

    StageWorker(settings, "monitor", commit_every=0.2).run(once=True)
    got, want = _outcome(url), _outcome(reference)
    assert got["cases"] and got["streams"]
    for part in ("cases", "dead_letters", "streams", "points", "alerts", "tickets"):
        assert got[part] == want[part], part
