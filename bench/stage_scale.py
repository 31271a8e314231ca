"""Scale of the two-stage topology (issue 9 "scale benchmark"; DESIGN.md §The flow, §Performance targets).

The mock Kafka broker serves ~1,000 records/s per consumer, so it is not what is timed: every consumer process gets
its partitions' records **pre-fetched** (``ingest.sources.Message`` lists, read from a file before the clock starts)
and runs exactly the per-batch work of ``vigil.stages.StageWorker`` — without the broker, the store transaction
(results, checkpoint, offsets) and the commit-time ``compute_window_metrics``, which are all excluded.

Feed: ``vigil.simulator`` "stable" (seed 7), sorted into arrival order as ``tests/test_stages.py`` does, with a feed
clock at the end, routed by patient over ``--partitions`` FHIR partitions with ``vigil.keyed_feed.route`` (resources
about no patient go to every partition, so records > resources).

1. **Stage 1** (``cases``) with 1, 2 and 4 consumers: separate OS processes (multiprocessing, spawn), consumer ``c``
   owning partitions ``p % C == c``, taking ``--batch`` records of each owned partition in turn and doing what
   ``StageWorker._cases`` does per batch — ``load_messages`` → ``Pipeline(mode="cases").ingest`` → ``take_outbox`` →
   ``encode_batch`` per model — under ``cyclic_gc_paused``, plus one ``encode_watermark`` progress record per batch.
   Timed: from a barrier all consumers pass together to each consumer's last batch; the aggregate rate uses the
   slowest consumer. Reference in the same run: ``orjson.loads`` over the same payloads in one process.
   The records each run publishes are compared byte for byte with the 1-consumer run (same input ⇒ same output).
2. **Stage 2** (``monitor``) with 1, 2 and 4 consumers over ``--cases-partitions`` cases-topic partitions (models
   hash to partitions with Kafka's partitioner): the records stage 1 published, in the order the producers would
   interleave them (round-robin over stage-1 partitions, batch by batch), each decoded with ``decode_record`` and
   given to ``Pipeline(mode="monitor").receive`` as ``StageWorker._monitor`` does. With the 2 models of
   ``examples/vigil.yaml`` at most 2 partitions carry observations, so it is measured again with ``--copies`` copies
   of every model config under new ids, each fed the same observations (a fleet of devices with equal traffic).
3. **State size**: pickled stage-2 pipelines (what ``vigil.checkpoint`` stores) per stream, resident memory growth of
   the stage-2 process (fresh process), and the pickled stage-1 pipeline (its checkpoint) per partition — both as
   left by the feed and after ``mark_stored`` + ``forget_stored`` (what ``store_and_checkpoint`` pickles).
4. **Per-observation cost against the number of streams** on the stage-2 path (``StreamStage.apply_ready`` with the
   ``Sequencer``): one consumer, all records, with every observation's site spread over ``F`` sub-sites
   (``site.k``, k = sequence number mod F) for F = 1 and ``--fanout``; and the ``Sequencer`` alone
   (decode + push + ready, no streams) on the same records, to show what it adds.

Untimed warm-ups: stage 1 runs each partition's first batch in a throwaway pipeline; stage 2 runs its records once
through a throwaway pipeline (the exact detector thresholds are computed at baseline completion and cached
process-wide, as in a long-running consumer; ``warm_up_s`` shows that one-off cost). Consumer processes are started
once and reused (``Workers``); the fan-out runs each get a fresh process. ``--json`` prints one JSON object.

Wall time is ``time.perf_counter`` (CLOCK_MONOTONIC, comparable across processes); CPU time is each process's own.
The machine has 2 cores: more than 2 consumers can only share them, so expect at most ~2× over one consumer.

``--quick``: 20 days × volume 0.5, 1 and 2 consumers, 2 copies, fan-out 10.

Stage-2 sources are named per stage-1 partition *and model* (``cases_topic``), not per partition as ``StageWorker``
names them: with StageWorker's naming the ``Sequencer`` drops as duplicates the observations of a second model in the
same cases partition; ``stageworker_source_naming`` in the output counts how many (measured, not timed).

    .venv/bin/python bench/stage_scale.py [--json] [--quick] [--days 60] [--volume 1] [--repeats 1]
                                          [--copies 4] [--fanout 20]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a script: `python bench/stage_scale.py`
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

CONSUMERS = (1, 2, 4)


# --- helpers ---------------------------------------------------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _settings(copies: int):
    """The example config; with ``copies`` > 1, every model config again under ids ``<id>-copy<j>``."""
    from vigil.settings import load_settings

    settings = load_settings()
    if copies <= 1:
        return settings
    models = [m.model_copy(update={"id": copy_id(m.id, j)}) for j in range(copies) for m in settings.models]
    return settings.model_copy(update={"models": models})


def copy_id(name: str, j: int) -> str:
    return name if j == 0 else f"{name}-copy{j}"


def make_feed(out: Path, days: int, volume: float) -> list[dict]:
    """The stable scenario in arrival order (reference data first), ending with the feed clock (tests/test_stages)."""
    from vigil.keyed_feed import feed_clock, subject_of
    from vigil.simulator import simulate

    simulate("stable", out, seed=7, days=days, volume=volume)
    found = [orjson.loads(line) for path in sorted(out.glob("*.ndjson")) for line in path.read_bytes().splitlines()]
    found.sort(key=lambda r: (subject_of(r) is not None, r.get("meta", {}).get("lastUpdated", ""),
                              r["resourceType"] == "RiskAssessment"))
    return [*found, feed_clock(found[-1]["meta"]["lastUpdated"])]


# --- stage 1 ---------------------------------------------------------------------------------------------------------

def _stage1_child(owned: list[int], feed_dir: str, batch: int, upstream: list[str], barrier) -> dict:
    """One stage-1 consumer: the per-batch work of ``StageWorker._cases`` on pre-fetched partitions."""
    from ingest import load_messages
    from ingest.load import cyclic_gc_paused
    from ingest.sources import Message
    from vigil.domain import Position
    from vigil.observations import encode_batch, encode_watermark
    from vigil.pipeline import Pipeline

    settings = _settings(1)
    messages = {p: [Message(Position("fhir", i, p), payload) for i, payload in
                    enumerate(Path(feed_dir, f"p{p}.ndjson").read_bytes().splitlines())] for p in owned}
    for p in owned:  # untimed warm-up (first use of the decoder, mapper and join code paths)
        warm = Pipeline(settings, mode="cases")
        warm.ingest(load_messages(messages[p][:batch], warm.decoder))
        warm.take_outbox()
    states = {p: Pipeline(settings, mode="cases") for p in owned}
    out: dict[int, list[tuple[list[tuple[str, bytes]], bytes]]] = {p: [] for p in owned}
    gc.collect()
    rss0 = _rss()
    cursors = dict.fromkeys(owned, 0)
    published = 0
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        live = [p for p in owned if cursors[p] < len(messages[p])]
        if not live:
            break
        for p in live:
            chunk = messages[p][cursors[p]:cursors[p] + batch]
            cursors[p] += len(chunk)
            state, source = states[p], f"fhir:{p}"
            with cyclic_gc_paused():
                state.ingest(load_messages(chunk, state.decoder))
                numbered = state.take_outbox()
                by_model: dict[str, list] = defaultdict(list)
                for seq, obs in numbered:
                    by_model[obs.model].append((seq, obs))
                records = [(model, encode_batch(source, rows)) for model, rows in sorted(by_model.items())]
                mark = encode_watermark(source, state.out_seq - 1, state.watermark_micros, upstream)
            published += len(numbered)
            out[p].append((records, mark))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss1 = _rss()
    checkpoint_bytes = {p: len(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)) for p, s in states.items()}
    for state in states.values():  # what store_and_checkpoint keeps after storing: settled cases forgotten
        state.result.mark_stored()
        state.forget_stored()
    stored_bytes = {p: len(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)) for p, s in states.items()}
    dead = sum(len(s.result.dead_letters) for s in states.values())
    return ({"owned": owned, "records": sum(len(m) for m in messages.values()), "observations": published,
               "wall_s": wall, "cpu_s": cpu, "start": t0, "end": t0 + wall, "rss_growth_bytes": rss1 - rss0,
               "checkpoint_bytes": checkpoint_bytes, "checkpoint_bytes_after_store": stored_bytes, "dead_letters": dead, "out": out})


class Workers:
    """Consumer processes (spawn), started once and reused by every measurement so interpreter start-up, imports and
    settings are not paid per run; a manager's barrier starts the consumers of one run together."""

    def __init__(self, processes: int):
        self.ctx = mp.get_context("spawn")
        self.manager = self.ctx.Manager()
        self.pool = self.ctx.Pool(processes)

    def run(self, target, per_child: list[tuple]) -> list[dict]:
        barrier = self.manager.Barrier(len(per_child))
        pending = [self.pool.apply_async(target, (*args, barrier)) for args in per_child]
        return [p.get() for p in pending]

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
        self.manager.shutdown()


def _fresh(target, args: tuple) -> dict:
    """One measurement in a new process (resident memory growth is that run's alone)."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(1) as pool:
        return pool.apply(target, (*args, manager.Barrier(1)))


def stage1(workers: Workers, consumers: int, partitions: int, feed_dir: Path, batch: int) -> dict:
    upstream = [f"fhir:{p}" for p in range(partitions)]
    owned = [[p for p in range(partitions) if p % consumers == c] for c in range(consumers)]
    rows = workers.run(_stage1_child, [(o, str(feed_dir), batch, upstream) for o in owned])
    wall = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    out = {p: batches for r in rows for p, batches in r.pop("out").items()}
    return {"consumers": consumers, "wall_s": wall, "records": sum(r["records"] for r in rows),
            "observations": sum(r["observations"] for r in rows), "dead_letters": sum(r["dead_letters"] for r in rows),
            "per_consumer": rows, "out": out}


# --- stage 2 ---------------------------------------------------------------------------------------------------------

def cases_topic(out: dict[int, list], models: list[str], cases_partitions: int, copies: int = 1,
                fanout: int = 1) -> dict[int, list]:
    """What each cases-topic partition holds: stage 1's records, round-robin over stage-1 partitions batch by batch
    (as concurrent producers interleave), progress records to every partition, then every source's end record.

    Sources are named per stage-1 partition **and model** (``fhir:<p>/<model>``), each with its own progress records:
    ``StageWorker`` names them per partition only, and the ``Sequencer`` then drops as duplicates the observations of
    a second model sharing the cases partition (the sequence numbers of one stage-1 partition are shared by its
    models) — see the report of issue 9; this layout is the one that counts every observation.
    ``copies``: the same observations again for model copies (own model ids); ``fanout``: every observation's site
    spread over that many sub-sites."""
    from vigil.keyed_feed import partition_for
    from vigil.observations import encode_watermark

    topic: dict[int, list[bytes]] = {c: [] for c in range(cases_partitions)}
    sources = sorted(out)
    names = [copy_id(m, j) for j in range(copies) for m in models]
    upstream = [f"fhir:{p}/{m}" for p in sources for m in names]
    depth = max(len(b) for b in out.values())
    for k in range(depth):
        for p in sources:
            if k >= len(out[p]):
                continue
            records, mark = out[p][k]
            for j in range(copies):
                for model, record in records:
                    name = copy_id(model, j)
                    topic[partition_for(name, cases_partitions)].append(_rewrite(record, name, j, fanout))
            wm = orjson.loads(mark)
            for name in names:
                wm_record = encode_watermark(f"{wm['source']}/{name}", wm["seq"], wm["watermark"], upstream)
                for c in topic:
                    topic[c].append(wm_record)
    for source in upstream:
        end = encode_watermark(source, -1, None, upstream, end=True)
        for c in topic:
            topic[c].append(end)
    return topic


def _rewrite(record: bytes, name: str, j: int, fanout: int) -> bytes:
    """An observation batch as source ``<partition>/<model>``, under model copy ``j``, sites spread over ``fanout``."""
    r = orjson.loads(record)
    r["source"] = f"{r['source']}/{name}"
    for row in r["obs"]:  # [seq, key, kind, model, version, site, ...]
        row[3] = copy_id(row[3], j)
        if fanout > 1:
            row[5] = f"{row[5]}.{row[0] % fanout}"
    return orjson.dumps(r)


def _streams(pipeline) -> int:
    return sum(len(m.streams) for run in pipeline.result.models.values() for m in run.monitors.values())


def _deliver(state, r: dict) -> int:
    """``StageWorker._monitor`` for one decoded record; returns the observations it carried."""
    if "obs" in r:
        state.receive(r["source"], r["obs"], None, [])
        return len(r["obs"])
    state.receive(r["source"], [], r.get("watermark"), r.get("upstream") or [], bool(r.get("end")))
    return 0


_ADVANCE_SECONDS = [0.0]


def _time_baseline_completions() -> list[float]:
    """Instrument (not replace) ``StreamMonitor.advance`` — a baseline's completion, where every stream's exact
    threshold is computed from its event rate — so that one-off cost per stream can be told from per-event cost."""
    from monitors.streams import StreamMonitor

    if not getattr(StreamMonitor.advance, "_bench_timed", False):
        inner = StreamMonitor.advance

        def advance(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return inner(self, *a, **k)
            finally:
                _ADVANCE_SECONDS[0] += time.perf_counter() - t0

        advance._bench_timed = True
        StreamMonitor.advance = advance
    return _ADVANCE_SECONDS


def _stage2_child(owned: list[int], topic_file: str, copies: int, sequencer_only: bool, barrier) -> dict:
    """One stage-2 consumer: ``StageWorker._monitor`` on pre-fetched cases-topic partitions."""
    from ingest.load import cyclic_gc_paused
    from vigil.observations import Sequencer, decode_record
    from vigil.pipeline import Pipeline

    settings = _settings(copies)
    with open(topic_file, "rb") as f:
        topic = pickle.load(f)
    records = {c: topic[c] for c in owned}
    del topic
    advance = _time_baseline_completions()
    w0 = time.perf_counter()
    if not sequencer_only:  # untimed: fills the process-wide caches of exact detector thresholds (monitors.calibrate)
        for c in owned:
            warm = Pipeline(settings, mode="monitor")
            for payload in records[c]:
                _deliver(warm, decode_record(payload))
        del warm
    warm_up_s = time.perf_counter() - w0
    gc.collect()
    rss0 = _rss()
    advance[0] = 0.0
    states = {c: Pipeline(settings, mode="monitor") for c in owned}
    sequencers = {c: Sequencer() for c in owned}
    observations = 0
    batch = 500  # records per poll and partition (each observation record holds one stage-1 batch of one model)
    cursors = dict.fromkeys(owned, 0)
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        live = [c for c in owned if cursors[c] < len(records[c])]
        if not live:
            break
        for c in live:
            chunk = records[c][cursors[c]:cursors[c] + batch]
            cursors[c] += len(chunk)
            with cyclic_gc_paused():
                for payload in chunk:
                    r = decode_record(payload)
                    if sequencer_only:
                        seq = sequencers[c]
                        if "obs" in r:
                            seq.push(r["source"], r["obs"])
                            observations += len(r["obs"])
                        else:
                            seq.progress(r["source"], r.get("watermark"), r.get("upstream") or [],
                                         bool(r.get("end")))
                        seq.ready(flush=seq.finished)
                    else:
                        observations += _deliver(states[c], r)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss1 = _rss()
    applied = sum(s.streams.applied for s in states.values())
    if not sequencer_only and applied != observations:
        raise SystemExit(f"stage 2 applied {applied} of {observations} observations: the feed did not end cleanly")
    row = {"owned": owned, "records": sum(len(r) for r in records.values()), "observations": observations,
           "wall_s": wall, "cpu_s": cpu, "start": t0, "end": t0 + wall, "warm_up_s": warm_up_s,
           "baseline_completion_s": advance[0]}
    if not sequencer_only:
        row |= {"streams": {c: _streams(s) for c, s in states.items()},
                "active_streams": sum(st.status == "active" for s in states.values()
                                      for run in s.result.models.values() for m in run.monitors.values()
                                      for st in m.streams.values()),
                "alerts": sum(len(s.result.alerts.alerts) for s in states.values()),
                "duplicates": sum(s.streams.sequencer.duplicates for s in states.values()),
                "state_bytes": {c: len(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)) for c, s in states.items()},
                "rss_growth_bytes": rss1 - rss0}
        for state in states.values():  # what store_and_checkpoint keeps after storing: stored day points forgotten
            state.result.mark_stored()
            state.forget_stored()
        row["state_bytes_after_store"] = {c: len(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL))
                                          for c, s in states.items()}
    return row


def stage2(workers: Workers | None, consumers: int, topic_file: Path, cases_partitions: int, copies: int,
           sequencer_only: bool = False) -> dict:
    """``workers`` None: one consumer in a fresh process."""
    owned = [[c for c in range(cases_partitions) if c % consumers == i] for i in range(consumers)]
    args = [(o, str(topic_file), copies, sequencer_only) for o in owned]
    rows = workers.run(_stage2_child, args) if workers else [_fresh(_stage2_child, args[0])]
    wall = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    result = {"consumers": consumers, "copies": copies, "wall_s": wall,
              "observations": sum(r["observations"] for r in rows), "per_consumer": rows}
    if not sequencer_only:
        result |= {"streams": sum(sum(r["streams"].values()) for r in rows),
                   "active_streams": sum(r["active_streams"] for r in rows),
                   "alerts": sum(r["alerts"] for r in rows),
                   "state_bytes": sum(sum(r["state_bytes"].values()) for r in rows),
                   "rss_growth_bytes": sum(r["rss_growth_bytes"] for r in rows)}
    return result


# --- the run ---------------------------------------------------------------------------------------------------------

def orjson_reference(feed_dir: Path, partitions: int, repeats: int) -> dict:
    payloads = [line for p in range(partitions) for line in Path(feed_dir, f"p{p}.ndjson").read_bytes().splitlines()]
    times, cpu = [], []
    for _ in range(max(3, repeats)):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        for payload in payloads:
            orjson.loads(payload)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"records": len(payloads), "median_s": statistics.median(times),
            "per_s": len(payloads) / statistics.median(times), "cpu_per_s": len(payloads) / statistics.median(cpu)}


def stageworker_layout_drops(out: dict[int, list], cases_partitions: int) -> dict:
    """Observations a ``Sequencer`` per cases partition drops as duplicates when the records carry StageWorker's
    source names (one per stage-1 partition, shared by its models); measured, not timed."""
    from vigil.keyed_feed import partition_for
    from vigil.observations import Sequencer, decode_record

    seqs = {c: Sequencer() for c in range(cases_partitions)}
    sent = 0
    depth = max(len(b) for b in out.values())
    for k in range(depth):
        for p in sorted(out):
            if k < len(out[p]):
                for model, record in out[p][k][0]:
                    r = decode_record(record)
                    seqs[partition_for(model, cases_partitions)].push(r["source"], r["obs"])
                    sent += len(r["obs"])
    return {"sent": sent, "dropped_as_duplicates": sum(s.duplicates for s in seqs.values())}


def _median_run(fn, repeats: int, **kwargs) -> dict:
    runs = [fn(**kwargs) for _ in range(repeats)]
    runs.sort(key=lambda r: r["wall_s"])
    best = runs[len(runs) // 2]
    best["all_wall_s"] = sorted(r["wall_s"] for r in runs)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/stage_scale.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small feed, 1 and 2 consumers, one repetition")
    ap.add_argument("--days", type=int, default=60, help="simulated days (default 60)")
    ap.add_argument("--volume", type=float, default=1.0, help="simulator volume (default 1)")
    ap.add_argument("--partitions", type=int, default=4, help="FHIR topic partitions (stage 1; default 4)")
    ap.add_argument("--cases-partitions", type=int, default=4, help="cases topic partitions (stage 2; default 4)")
    ap.add_argument("--batch", type=int, default=2000, help="records per stage-1 partition batch (default 2000)")
    ap.add_argument("--copies", type=int, default=4, help="model-config copies for stage-2 parallelism (default 4)")
    ap.add_argument("--fanout", type=int, default=20, help="sub-sites per site for the many-streams size")
    ap.add_argument("--repeats", type=int, default=1, help="repetitions of each timed run; the median is reported")
    ap.add_argument("--json", action="store_true", help="print one JSON object (and the summary on stderr)")
    args = ap.parse_args(argv)
    if args.quick:
        args.days, args.volume, args.repeats, args.copies, args.fanout = 20, 0.5, 1, 2, 10
    consumers = (1, 2) if args.quick else CONSUMERS
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    began = time.perf_counter()
    load0 = os.getloadavg()
    from vigil.keyed_feed import partition_for, route

    workers = Workers(max(consumers))
    with tempfile.TemporaryDirectory(prefix="vigil-stage-bench-") as tmp:
        feed = make_feed(Path(tmp) / "sim", args.days, args.volume)
        by_partition: dict[int, list[bytes]] = defaultdict(list)
        for p, payload in route(feed, args.partitions):
            by_partition[p].append(payload)
        feed_dir = Path(tmp) / "partitions"
        feed_dir.mkdir()
        for p in range(args.partitions):
            (feed_dir / f"p{p}.ndjson").write_bytes(b"\n".join(by_partition[p]))
        records = sum(len(v) for v in by_partition.values())
        say(f"feed: stable, seed 7, {args.days} days x volume {args.volume}: {len(feed):,} resources → "
            f"{records:,} records over {args.partitions} partitions "
            f"({', '.join(f'{len(by_partition[p]):,}' for p in range(args.partitions))}); load {load0[0]:.1f}")
        reference = orjson_reference(feed_dir, args.partitions, args.repeats)
        say(f"reference orjson.loads: {reference['per_s']:,.0f} records/s")

        s1 = {}
        for n in consumers:
            s1[n] = _median_run(stage1, args.repeats, workers=workers, consumers=n, partitions=args.partitions, feed_dir=feed_dir,
                                batch=args.batch)
            say(f"stage 1, {n} consumer(s): {s1[n]['wall_s']:.2f} s, {s1[n]['records'] / s1[n]['wall_s']:,.0f} "
                f"records/s, {len(feed) / s1[n]['wall_s']:,.0f} resources/s")
        out = s1[1]["out"]
        same = {n: s1[n]["out"] == out for n in consumers}
        if not all(same.values()):
            raise SystemExit(f"stage 1 published different records with different consumer counts: {same}")
        if s1[1]["observations"] == 0:
            raise SystemExit("stage 1 published no observations: the benchmark would time nothing")

        drops = stageworker_layout_drops(out, args.cases_partitions)
        say(f"StageWorker's source naming: {drops['dropped_as_duplicates']:,} of {drops['sent']:,} observations "
            f"dropped as duplicates by the Sequencer")
        settings = _settings(1)
        model_ids = [m.id for m in settings.models]
        layouts = {}
        s2: dict[str, dict[int, dict]] = {}
        for copies in (1, args.copies):
            ids = [copy_id(m, j) for j in range(copies) for m in model_ids]
            layouts[copies] = {m: partition_for(m, args.cases_partitions) for m in ids}
            topic = cases_topic(out, model_ids, args.cases_partitions, copies)
            topic_file = Path(tmp) / f"cases-{copies}.pickle"
            topic_file.write_bytes(pickle.dumps(topic, protocol=pickle.HIGHEST_PROTOCOL))
            s2[str(copies)] = {}
            for n in consumers:
                s2[str(copies)][n] = _median_run(stage2, args.repeats, workers=workers, consumers=n, topic_file=topic_file,
                                                 cases_partitions=args.cases_partitions, copies=copies)
                r = s2[str(copies)][n]
                say(f"stage 2, {len(ids)} models, {n} consumer(s): {r['wall_s']:.2f} s, "
                    f"{r['observations'] / r['wall_s']:,.0f} observations/s")

        fan: dict[int, dict] = {}
        for f in (1, args.fanout):
            topic_file = Path(tmp) / f"cases-fan{f}.pickle"
            topic_file.write_bytes(pickle.dumps(cases_topic(out, model_ids, 1, 1, f), protocol=pickle.HIGHEST_PROTOCOL))
            full = _median_run(stage2, args.repeats, workers=None, consumers=1, topic_file=topic_file, cases_partitions=1,
                               copies=1)
            seq = _median_run(stage2, args.repeats, workers=workers, consumers=1, topic_file=topic_file, cases_partitions=1,
                              copies=1, sequencer_only=True)
            fan[f] = {"streams": full["streams"], "active_streams": full["active_streams"],
                      "observations": full["observations"], "warm_up_s": full["per_consumer"][0]["warm_up_s"],
                      "baseline_completion_s": full["per_consumer"][0]["baseline_completion_s"],
                      "us_per_observation_without_baseline_completion":
                          (full["wall_s"] - full["per_consumer"][0]["baseline_completion_s"]) / full["observations"] * 1e6,
                      "us_per_observation": full["wall_s"] / full["observations"] * 1e6,
                      "sequencer_us_per_observation": seq["wall_s"] / seq["observations"] * 1e6,
                      "cpu_us_per_observation": full["per_consumer"][0]["cpu_s"] / full["observations"] * 1e6,
                      "sequencer_cpu_us_per_observation": seq["per_consumer"][0]["cpu_s"] / seq["observations"] * 1e6,
                      "state_bytes": full["state_bytes"], "rss_growth_bytes": full["rss_growth_bytes"],
                      "state_bytes_after_store": sum(full["per_consumer"][0]["state_bytes_after_store"].values()),
                      "bytes_per_stream": full["state_bytes"] / full["streams"]}
            say(f"stage 2 fan-out {f}: {full['streams']:,} streams, {fan[f]['us_per_observation']:.2f} µs/observation "
                f"({fan[f]['cpu_us_per_observation']:.2f} CPU), "
                f"{fan[f]['us_per_observation_without_baseline_completion']:.2f} without baseline completions "
                f"(sequencer + decode alone {fan[f]['sequencer_us_per_observation']:.2f})")

    workers.close()
    for rows in (s1, *s2.values()):
        for r in rows.values():
            r.pop("out", None)
    base1 = s1[1]["wall_s"]
    stage1_rows = [{"consumers": n, "wall_s": r["wall_s"], "all_wall_s": r["all_wall_s"],
                    "records_per_s": r["records"] / r["wall_s"], "resources_per_s": len(feed) / r["wall_s"],
                    "resources_per_s_per_consumer": len(feed) / r["wall_s"] / n, "speedup": base1 / r["wall_s"],
                    "ratio_to_orjson": (r["records"] / r["wall_s"]) / reference["per_s"],
                    "consumer_wall_s": [c["wall_s"] for c in r["per_consumer"]],
                    "consumer_cpu_s": [c["cpu_s"] for c in r["per_consumer"]],
                    "consumer_records": [c["records"] for c in r["per_consumer"]],
                    "consumer_records_per_cpu_s": [c["records"] / c["cpu_s"] for c in r["per_consumer"]],
                    "cpu_ratio_to_orjson": [c["records"] / c["cpu_s"] / reference["cpu_per_s"]
                                            for c in r["per_consumer"]]} for n, r in s1.items()]
    checkpoints = {p: b for c in s1[1]["per_consumer"] for p, b in c["checkpoint_bytes"].items()}
    stored_checkpoints = {p: b for c in s1[1]["per_consumer"] for p, b in c["checkpoint_bytes_after_store"].items()}
    stage2_rows = []
    for copies, rows in s2.items():
        b = rows[1]["wall_s"]
        for n, r in rows.items():
            stage2_rows.append({
                "models": len(model_ids) * int(copies), "consumers": n, "wall_s": r["wall_s"],
                "all_wall_s": r["all_wall_s"], "observations": r["observations"],
                "observations_per_s": r["observations"] / r["wall_s"],
                "resources_per_s_equivalent": len(feed) * int(copies) / r["wall_s"],
                "speedup": b / r["wall_s"], "streams": r["streams"], "alerts": r["alerts"],
                "consumer_wall_s": [c["wall_s"] for c in r["per_consumer"]],
                "consumer_cpu_s": [c["cpu_s"] for c in r["per_consumer"]],
                "consumer_observations": [c["observations"] for c in r["per_consumer"]],
                "consumer_warm_up_s": [c["warm_up_s"] for c in r["per_consumer"]],
                "observations_per_cpu_s": r["observations"] / sum(c["cpu_s"] for c in r["per_consumer"]),
                "state_bytes": r["state_bytes"], "bytes_per_stream": r["state_bytes"] / r["streams"],
                "rss_growth_bytes": r["rss_growth_bytes"]})
    busy = {c: sorted({p for p in layout.values()}) for c, layout in layouts.items()}
    report = {
        "machine": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "nproc": os.cpu_count(),
                    "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "args": vars(args),
        "feed": {"scenario": "stable", "seed": 7, "resources": len(feed), "records": records,
                 "records_per_partition": [len(by_partition[p]) for p in range(args.partitions)],
                 "observations": s1[1]["observations"], "dead_letters": s1[1]["dead_letters"]},
        "reference_orjson": reference,
        "stage1": stage1_rows,
        "stage1_same_output_all_consumer_counts": True,
        "stage1_checkpoint_bytes_per_partition": checkpoints,
        "stage1_checkpoint_bytes_per_partition_after_store": stored_checkpoints,
        "cases_partition_of_model": {str(c): v for c, v in layouts.items()},
        "cases_partitions_with_observations": {str(c): v for c, v in busy.items()},
        "stageworker_source_naming": drops,
        "stage2": stage2_rows,
        "streams_scaling": {str(f): v for f, v in fan.items()},
        "total_seconds": time.perf_counter() - began,
    }
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    say(f"done in {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
