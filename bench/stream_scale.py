"""Per-event cost and resident memory from 100 to 100,000 streams (DESIGN.md "Performance targets": per-event cost
flat in the number of streams; 100,000 streams in < 1 GiB resident).

Two measurements, each in a fresh child process per stream count (so one size's memory does not hide in another's
heap, and RSS is that of the structure alone):

1. ``monitor`` — ``monitors.streams.StreamMonitor``, what the pipeline keeps: one model, the unlabeled rate metric
   ``unmapped_rate`` (a Bernoulli CUSUM per stream), S − 1 sites each with one stream plus the site-wide stream
   ("all"), which every event also feeds (so each event updates 2 streams, whatever S). A one-day baseline of
   ``--baseline-per-stream`` events per stream calibrates every stream (family budget → ARL0 → exact threshold);
   then ``--events`` events, spread uniformly over the streams and in time order over ``--days`` days, are timed
   (generated 10,000 at a time, untimed, so the benchmark's own lists stay small).
2. ``detectors`` — the bare detector objects (``BernoulliCusum``, ``__slots__``) in a dict keyed by ``StreamKey``:
   the per-stream state floor, one update per event.

``--gc paused`` times the events with Python's cycle collector paused, as the pipeline runs a batch
(``ingest.load.cyclic_gc_paused`` in ``Pipeline.run_paths``): the collector's full scans grow with the heap, i.e. with
the number of streams and day points, so this separates that cost from the per-event work. The default ``on`` is
the measurement BENCHMARKS.md §2 reports.

Per-event cost = wall time / events of the timed phase (median of ``--repeats``); memory = peak RSS
(``resource.getrusage``, ru_maxrss) and current RSS (/proc/self/status VmRSS) after the timed phase, minus the RSS
of the same child process before building anything. ``StreamMonitor`` also keeps one ``DayPoint`` per stream per
day with an observation (for the dashboards), so its memory grows with days × active streams; ``--days`` sets it.

    python -m bench.stream_scale [--quick] [--sizes 100 1000 10000 100000] [--gc on|paused] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from datetime import datetime, timedelta, timezone

import numpy as np

_CHUNK = 10_000  # events generated at a time (not timed)


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _timed_phase(gc_mode: str) -> contextlib.AbstractContextManager:
    if gc_mode == "paused":
        from ingest.load import cyclic_gc_paused

        return cyclic_gc_paused()
    return contextlib.nullcontext()


def _monitor(n_streams: int, events: int, days: int, baseline_per_stream: int, repeats: int, seed: int,
             gc_mode: str = "on") -> dict:
    from monitors.streams import StreamMonitor
    from vigil.domain import ALL
    from vigil.settings import ModelConfig, MonitorConfig, OutcomeConfig, SubgroupConfig

    gc.collect()
    rss0 = _rss_now()  # after the imports: the structure's memory only
    model = ModelConfig(id="m", name="bench", threshold=0.5, label_window=timedelta(days=1),
                        outcome=OutcomeConfig(id="o", kind="code_set"))
    cfg = MonitorConfig(baseline_days=1, metrics=["unmapped_rate"])
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    monitor = StreamMonitor(model, "1", cfg, SubgroupConfig(min_n=30), start)
    rng = np.random.default_rng(seed)
    sites = [f"s{i}" for i in range(n_streams - 1)]
    cells = [ALL]
    t_base = time.perf_counter()
    base_time = start + timedelta(hours=1)
    ys = (rng.random(len(sites) * baseline_per_stream) < 0.05).astype(float).tolist()
    i = 0
    for _ in range(baseline_per_stream):
        for site in sites:
            monitor.observe("unmapped_rate", site, cells, ys[i], base_time, base_time)
            i += 1
    baseline_seconds = time.perf_counter() - t_base
    t_cal = time.perf_counter()
    first = start + timedelta(days=1, minutes=1)
    monitor.advance(first)
    calibrate_seconds = time.perf_counter() - t_cal
    active = sum(s.status == "active" for s in monitor.streams.values())
    times = []
    alarms = 0
    chunks = max(1, events // _CHUNK)
    for r in range(repeats):
        elapsed = 0.0
        for c in range(chunks):  # events in time order; generated per chunk so the plan's memory stays small
            when = first + timedelta(days=r * days + (c * days) // chunks)
            plan = [(sites[w], y) for w, y in zip(rng.integers(0, len(sites), _CHUNK).tolist(),
                                                  (rng.random(_CHUNK) < 0.05).astype(float).tolist(), strict=True)]
            with _timed_phase(gc_mode):
                t0 = time.perf_counter()
                for site, x in plan:
                    alarms += len(monitor.observe("unmapped_rate", site, cells, x, when, when))
                elapsed += time.perf_counter() - t0
        times.append(elapsed)
    events = chunks * _CHUNK
    points = sum(len(s.points) for s in monitor.streams.values())
    return {"kind": "monitor", "streams": len(monitor.streams), "active": active, "events": events,
            "per_event_us": statistics.median(times) / events * 1e6, "alarms": alarms,
            "baseline_events": len(ys), "baseline_us_per_event": baseline_seconds / len(ys) * 1e6,
            "calibrate_seconds": calibrate_seconds, "day_points": points,
            "day_points_per_event": points / (events * repeats), "gc": gc_mode,
            "rss_bytes": _rss_now() - rss0, "peak_rss_bytes": _peak_rss() - rss0,
            "bytes_per_stream": (_rss_now() - rss0) / n_streams}


def _detectors(n_streams: int, events: int, repeats: int, seed: int) -> dict:
    from monitors.calibrate import bernoulli_threshold
    from monitors.detectors import BernoulliCusum
    from vigil.domain import StreamKey

    gc.collect()
    rss0 = _rss_now()  # after the imports: the structure's memory only
    h = bernoulli_threshold(0.05, 2 * 0.05 / 1.05, 1e6)
    keys = [StreamKey("m", "1", "unmapped_rate", f"s{i}") for i in range(n_streams)]
    detectors = {k: BernoulliCusum(0.05, 2 * 0.05 / 1.05, h) for k in keys}
    rng = np.random.default_rng(seed)
    times = []
    chunks = max(1, events // _CHUNK)
    for _ in range(repeats):
        elapsed = 0.0
        for _ in range(chunks):
            plan = [(keys[w], y) for w, y in zip(rng.integers(0, n_streams, _CHUNK).tolist(),
                                                  (rng.random(_CHUNK) < 0.05).astype(float).tolist(), strict=True)]
            t0 = time.perf_counter()
            for key, y in plan:
                detectors[key].update(y)
            elapsed += time.perf_counter() - t0
        times.append(elapsed)
    events = chunks * _CHUNK
    return {"kind": "detectors", "streams": len(detectors), "events": events,
            "per_event_us": statistics.median(times) / events * 1e6,
            "rss_bytes": _rss_now() - rss0, "peak_rss_bytes": _peak_rss() - rss0,
            "bytes_per_stream": (_rss_now() - rss0) / n_streams}


def _child(kind: str, kwargs: dict, queue: mp.Queue) -> None:
    queue.put(_monitor(**kwargs) if kind == "monitor" else _detectors(**kwargs))


def measure(kind: str, **kwargs) -> dict:
    ctx = mp.get_context("spawn")  # a clean interpreter: RSS is this measurement's alone
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(kind, kwargs, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: fewer events and repeats")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10_000, 100_000])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--days", type=int, default=7, help="days the timed events span (DayPoints per stream)")
    parser.add_argument("--baseline-per-stream", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gc", choices=("on", "paused"), default="on",
                        help="cycle collector during the timed monitor events (paused: as Pipeline.run_paths)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.repeats = 50_000, 1
    rows = []
    for n in args.sizes:
        for kind in ("detectors", "monitor"):
            kwargs = {"n_streams": n, "events": args.events, "repeats": args.repeats, "seed": 1}
            if kind == "monitor":
                kwargs |= {"days": args.days, "baseline_per_stream": args.baseline_per_stream, "gc_mode": args.gc}
            row = measure(kind, **kwargs)
            rows.append(row)
            print(f"{kind:9s} {row['streams']:>7,} streams: {row['per_event_us']:6.2f} µs/event, "
                  f"RSS +{row['rss_bytes'] / 2**20:7.1f} MiB (peak +{row['peak_rss_bytes'] / 2**20:7.1f} MiB), "
                  f"{row['bytes_per_stream']:6.0f} B/stream", flush=True)
    print("\n| structure | streams | µs / event | RSS (MiB) | peak RSS (MiB) | bytes / stream | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        notes = ""
        if r["kind"] == "monitor":
            notes = (f"{r['active']:,} active; {r['day_points']:,} DayPoints "
                     f"({r['day_points_per_event']:.2f} new per event); gc {r['gc']}; baseline {r['baseline_us_per_event']:.1f} "
                     f"µs/event; calibration {r['calibrate_seconds']:.1f} s; {r['alarms']} alarms")
        print(f"| {r['kind']} | {r['streams']:,} | {r['per_event_us']:.2f} | {r['rss_bytes'] / 2**20:.1f} | "
              f"{r['peak_rss_bytes'] / 2**20:.1f} | {r['bytes_per_stream']:.0f} | {notes} |")
    print(f"\n{platform.python_implementation()} {platform.python_version()}; events={args.events}, "
          f"repeats={args.repeats}, days={args.days}, gc={args.gc}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
