"""Issue #9 reliability campaign, part "store outage": crash PostgreSQL K times under a running `vigil run` and check
that the stored results equal an uninterrupted run. Measured and rerunnable::

    .venv/bin/python scripts/reliability/store_outage.py --outages 5 [--down 2] [--seed 9] [--json]

What it does:

1. Starts a throwaway PostgreSQL cluster of its own (Debian's server binaries, as the test suite does: see
   ``DedicatedPostgres`` in tests/test_store_outage.py) and simulates a feed (default: the scanner-upgrade scenario
   over 110 days at volume 0.5, the size of tests/test_service.py's feed), replayed in arrival order through
   ``FeedSource``.
2. Runs the service over the whole feed into one database (the reference), then into a second database while a
   separate thread crashes PostgreSQL ``--outages`` times (``pg_ctl stop -m immediate``: every backend aborted, no
   shutdown checkpoint), each time keeping it down until the service has noticed and ``--down`` seconds more, then
   starting it again (``pg_ctl start``, which includes crash recovery). Each crash comes after a
   randomly chosen commit of the service plus a random delay of up to one commit interval, so crashes land while the
   service is reading, processing or in the middle of a transaction.
3. Prints the figures: outages injected and seen by the service, total downtime, commits, messages (and how many were
   read again), whether the stored alerts, tickets, case labels and counts, dead letters, metric points, stream states
   and audit chain equal the reference (tests/test_service.py's ``_outcome``; rows that differ are listed), and the
   recovery time after each restart (until the service resumed from the store, and until its next stored
   transaction).

The service runs with its production backoff (0.5 s doubling to 30 s, with jitter) unless ``--max-wait`` says
otherwise; the recovery time after a restart includes the rest of the backoff wait in progress.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests"):  # run as a script from anywhere: the repo's packages and test helpers first
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from test_service import _outcome  # noqa: E402
from test_store_outage import CommitHook, DedicatedPostgres, feed_payloads  # noqa: E402

from vigil.service import Service, ServiceReport  # noqa: E402
from vigil.settings import load_settings  # noqa: E402
from vigil.store_outage import StoreRetry  # noqa: E402


@dataclass
class Outage:
    after_commit: int
    delay_s: float
    stopped_at: float = 0.0
    noticed_after_s: float = 0.0  # from the crash until the service touched the store and found it gone
    restarted_at: float = 0.0
    resumed_at: float | None = None  # the service restored from the store (log "answers again")
    first_commit_at: float | None = None  # the service's next stored transaction

    @property
    def down_s(self) -> float:
        return self.restarted_at - self.stopped_at


@dataclass
class Figures:
    feed_messages: int
    outages_injected: int
    outages_seen: int
    downtime_s: float
    service_waited_s: float
    commits: int
    reference_commits: int
    messages: int
    reread: int
    equal: bool
    differences: dict[str, dict[str, list]] = field(default_factory=dict)
    noticed_after_crash_s: list[float] = field(default_factory=list)
    resume_after_restart_s: list[float] = field(default_factory=list)
    commit_after_restart_s: list[float] = field(default_factory=list)
    run_s: float = 0.0
    reference_run_s: float = 0.0


class _Resumed(logging.Handler):
    """Timestamps of the service's "the store answers again" log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "answers again" in record.getMessage():
            self.at.append(time.monotonic())


def _differences(got: dict, want: dict, limit: int = 5) -> dict[str, dict[str, list]]:
    """Per key of the outcome that differs: up to ``limit`` rows only in this run (``extra``) and only in the
    uninterrupted one (``missing``), and both row counts."""
    diff: dict[str, dict[str, list]] = {}
    for key in want:
        if got.get(key) == want[key]:
            continue
        if isinstance(want[key], list):
            have, need = Counter(got.get(key, [])), Counter(want[key])
            diff[key] = {"extra": [repr(r) for r in list((have - need).elements())[:limit]],
                         "missing": [repr(r) for r in list((need - have).elements())[:limit]],
                         "counts": [len(got.get(key, [])), len(want[key])]}
        else:
            diff[key] = {"got": [repr(got.get(key))], "want": [repr(want[key])]}
    return diff


def campaign(outages: int, down_s: float, seed: int, batch: int, scenario: str, days: int, change_day: int,
             volume: float, retry: StoreRetry) -> Figures:
    rng = random.Random(seed)
    payloads = feed_payloads(scenario, days=days, change_day=change_day, volume=volume, seed=seed)
    pg = DedicatedPostgres()
    try:
        def service(url: str, source: CommitHook) -> Service:
            return Service(load_settings(store_url=url), [source], commit_every=0.0, max_batch=batch,
                           poll_timeout=0.0, retry=retry, rng=random.Random(seed))

        reference_url = pg.database("reference")
        started = time.monotonic()
        reference: ServiceReport = service(reference_url, CommitHook(payloads)).run(once=True)
        reference_run_s = time.monotonic() - started
        want = _outcome(reference_url)
        interval = reference_run_s / max(reference.commits, 1)

        # crash after distinct random commits, leaving the last few commits free so every crash hits a live service
        after = sorted(rng.sample(range(1, max(reference.commits - 2, outages + 1)), outages))
        plan = [Outage(c, rng.uniform(0, interval)) for c in after]
        commits_seen: list[float] = []
        progress = threading.Condition()
        finished = threading.Event()

        def after_commit(n: int) -> None:
            with progress:
                commits_seen.append(time.monotonic())
                progress.notify_all()

        def crasher() -> None:
            for outage in plan:
                with progress:
                    progress.wait_for(lambda: finished.is_set() or len(commits_seen) >= outage.after_commit)
                    if finished.is_set():
                        return
                time.sleep(outage.delay_s)
                seen = crashing.report.outages
                pg.stop()
                outage.stopped_at = time.monotonic()
                deadline = outage.stopped_at + 120  # down until the service noticed, then --down seconds more
                while crashing.report.outages == seen and time.monotonic() < deadline and not finished.is_set():
                    time.sleep(0.05)
                outage.noticed_after_s = time.monotonic() - outage.stopped_at
                time.sleep(down_s)
                pg.start()
                outage.restarted_at = time.monotonic()
                with progress:  # the next crash only after the service stored something again
                    progress.wait_for(lambda: finished.is_set() or commits_seen[-1] > outage.restarted_at)

        url = pg.database("outages")
        crashing = service(url, CommitHook(payloads, after_commit))
        resumed = _Resumed()
        logging.getLogger("vigil.service").addHandler(resumed)
        thread = threading.Thread(target=crasher, daemon=True)
        thread.start()
        started = time.monotonic()
        try:
            report = crashing.run(once=True)
        finally:
            run_s = time.monotonic() - started
            with progress:
                finished.set()
                progress.notify_all()
            logging.getLogger("vigil.service").removeHandler(resumed)
            thread.join(60)
        got = _outcome(url)
        for outage in plan:
            if outage.restarted_at:
                outage.resumed_at = next((t for t in resumed.at if t >= outage.restarted_at), None)
                outage.first_commit_at = next((t for t in commits_seen if t >= outage.restarted_at), None)
        done = [o for o in plan if o.restarted_at]
        return Figures(
            feed_messages=len(payloads), outages_injected=len(done), outages_seen=report.outages,
            downtime_s=round(sum(o.down_s for o in done), 3), service_waited_s=round(report.outage_seconds, 3),
            commits=report.commits, reference_commits=reference.commits, messages=report.messages,
            reread=report.reread, equal=got == want, differences=_differences(got, want),
            noticed_after_crash_s=[round(o.noticed_after_s, 3) for o in done],
            resume_after_restart_s=[round(o.resumed_at - o.restarted_at, 3) for o in done if o.resumed_at],
            commit_after_restart_s=[round(o.first_commit_at - o.restarted_at, 3) for o in done if o.first_commit_at],
            run_s=round(run_s, 1), reference_run_s=round(reference_run_s, 1))
    finally:
        pg.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outages", type=int, default=5, help="how many times PostgreSQL is crashed (default 5)")
    parser.add_argument("--down", type=float, default=2.0, help="seconds PostgreSQL stays down each time")
    parser.add_argument("--seed", type=int, default=9, help="feed and crash-point seed")
    parser.add_argument("--batch", type=int, default=2000, help="messages per poll (one commit per poll)")
    parser.add_argument("--scenario", default="scanner-upgrade")
    parser.add_argument("--days", type=int, default=110)
    parser.add_argument("--change-day", type=int, default=50)
    parser.add_argument("--volume", type=float, default=0.5)
    parser.add_argument("--max-wait", type=float, default=30.0, help="longest single backoff wait, seconds")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.outages < 1 or args.down <= 0:
        parser.error("need --outages >= 1 and --down > 0")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # print warnings; INFO only reaches _Resumed
    logging.getLogger("vigil.service").setLevel(logging.INFO)
    figures = campaign(args.outages, args.down, args.seed, args.batch, args.scenario, args.days, args.change_day,
                       args.volume, StoreRetry(max_s=max(args.max_wait, 0.5)))
    if args.json:
        print(json.dumps(asdict(figures), indent=2))
    else:
        _print(figures)
    return 0 if figures.equal and figures.outages_seen >= figures.outages_injected == args.outages else 1


def _print(f: Figures) -> None:
    def stats(values: list[float]) -> str:
        if not values:
            return "n/a"
        return (f"mean {sum(values) / len(values):.2f} s, max {max(values):.2f} s "
                f"({', '.join(f'{v:.2f}' for v in values)})")

    print(f"feed: {f.feed_messages} messages")
    print(f"outages: {f.outages_injected} injected, {f.outages_seen} seen by the service")
    print(f"downtime: {f.downtime_s:.1f} s in total; the service waited {f.service_waited_s:.1f} s")
    print(f"commits: {f.commits} (uninterrupted run: {f.reference_commits})")
    print(f"messages: {f.messages} read, of which {f.reread} read again after an outage")
    print(f"equal to the uninterrupted run: {'yes' if f.equal else 'NO'}")
    for key, diff in f.differences.items():
        print(f"  {key}: {json.dumps(diff)}")
    print(f"outage noticed by the service after the crash: {stats(f.noticed_after_crash_s)}")
    print(f"recovery after restart, until resumed from the store: {stats(f.resume_after_restart_s)}")
    print(f"recovery after restart, until the next stored transaction: {stats(f.commit_after_restart_s)}")
    print(f"wall time: {f.run_s:.1f} s with outages, {f.reference_run_s:.1f} s uninterrupted")


if __name__ == "__main__":
    sys.exit(main())
