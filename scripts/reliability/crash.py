"""Crash campaign (issue 9): SIGKILL either stage at random points, many times, during a long simulated feed.

Two `vigil run --stage cases` and two `--stage monitor` processes run against librdkafka's mock cluster (a real
Kafka-protocol server) and a throwaway PostgreSQL cluster (the one the tests start, tests/conftest.py). While they
work, a random live process of a random stage is SIGKILLed after a random pause and started again, ``--kills``
times. When all have finished, the store must hold exactly what the embedded default (one process, no broker) stores
for the same feed: every case label, stream state, daily point, alert, ticket and dead letter.

    .venv/bin/python scripts/reliability/crash.py --kills 8 --json

The processes are tests/stage_process.py (the CLI, with the mock broker's SyncGroup quirk worked around).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import conftest  # noqa: E402  (the throwaway PostgreSQL cluster of the tests)
import orjson  # noqa: E402
import test_stages as staged  # noqa: E402  (feed layout, config, process start, store comparison)
from kafka_mock import MockCluster  # noqa: E402

from vigil.keyed_feed import in_arrival_order, route  # noqa: E402
from vigil.persist import persist  # noqa: E402
from vigil.pipeline import Pipeline  # noqa: E402
from vigil.settings import load_settings  # noqa: E402
from vigil.simulator import simulate  # noqa: E402
from vigil.store import upgrade  # noqa: E402

PARTS = ("cases", "dead_letters", "streams", "points", "alerts", "tickets")


def feed(work: Path, days: int, volume: float, seed: int) -> list[dict]:
    out = work / "feed"
    simulate("scanner-upgrade", out, seed=seed, days=days, change_day=days // 3, volume=volume)
    return in_arrival_order(orjson.loads(line) for path in sorted(out.glob("*.ndjson"))
                            for line in path.read_bytes().splitlines())


def campaign(kills: int, seed: int, days: int, volume: float, partitions: int, work: Path) -> dict:
    rng = random.Random(seed)
    started = time.monotonic()
    resources = feed(work, days, volume, seed)
    path = work / "feed.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in resources) + b"\n")
    reference_url = f"sqlite:///{work / 'embedded.db'}"
    persist(Pipeline(load_settings()).run_paths([path]), load_settings(store_url=reference_url), ["feed"],
            datetime.now(UTC))
    want = staged._outcome(reference_url)
    with contextlib.ExitStack() as stack:
        cluster_pg = stack.enter_context(contextlib.contextmanager(conftest.postgres_cluster.__wrapped__)())
        _, url = cluster_pg.create_database()
        upgrade(url)
        kafka = MockCluster(group_initial_rebalance_delay_ms=0)
        stack.callback(kafka.close)
        kafka.create_topic("fhir", partitions)
        records = list(route(resources, partitions))
        kafka.produce("fhir", records)
        config = staged._config(work, kafka.bootstrap, url)
        logs = {name: work / f"{name}.log" for name in ("cases-1", "cases-2", "monitor-1", "monitor-2")}
        procs = {name: staged._start(config, name.split("-")[0], log) for name, log in logs.items()}
        done: list[dict] = []
        deadline, last = time.monotonic() + 900, -1
        while len(done) < kills and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 3.0))
            stored = staged._stored_offsets(url)
            while stored <= last and time.monotonic() < deadline:  # spread the kills over the run: wait for progress
                time.sleep(0.2)
                stored = staged._stored_offsets(url)
            live = [n for n, p in procs.items() if p.poll() is None]
            if not live or stored >= len(records):
                break
            name = rng.choice(live)
            last = stored
            procs[name].send_signal(signal.SIGKILL)
            procs[name].wait()
            procs[name] = staged._start(config, name.split("-")[0], logs[name])
            done.append({"process": name, "stage1_stored": int(stored), "of": len(records)})
        codes = {}
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a hung process is a failed campaign, reported below
                proc.kill()
                codes[name] = "timeout"
        got = staged._outcome(url)
    equal = {part: got[part] == want[part] for part in PARTS}
    differing = {part: {"embedded": len(want[part]), "staged": len(got[part])} for part in PARTS if not equal[part]}
    return {
        "feed": {"scenario": "scanner-upgrade", "days": days, "volume": volume, "seed": seed,
                 "resources": len(resources), "records": len(records), "partitions": partitions},
        "kills": done, "kills_by_stage": {s: sum(k["process"].startswith(s) for k in done) for s in ("cases",
                                                                                                     "monitor")},
        "exit_codes": codes, "equal": equal, "differing": differing,
        "counts": {part: len(want[part]) for part in PARTS},
        "ok": all(equal.values()) and all(c == 0 for c in codes.values()) and len(done) == kills,
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--volume", type=float, default=0.4)
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vigil-crash-") as tmp:
        report = campaign(args.kills, args.seed, args.days, args.volume, args.partitions, Path(tmp))
    print(json.dumps(report, indent=2, default=str) if args.json else
          f"{len(report['kills'])} kills ({report['kills_by_stage']}); equal: {report['equal']}; ok: {report['ok']}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
