"""Ingest throughput, as ratios against references timed in the same run (DESIGN.md "Performance targets").

Fast path, on a simulated "stable" feed (the NDJSON files only):
  reference  plain ``orjson.loads`` of every line of the files
  ingest     ``ingest.load(files, Decoder(SubjectKeyer("k")))``            read + decode + de-identify
  pipeline   ``Pipeline(load_settings()).run_paths(files)``                 + reference data, label join, detectors
Strict mode, on an evenly spaced sample of the same feed, already parsed (parsing is not timed):
  reference  ``get_fhir_model_class(t).model_validate(d)`` for every dict   fhir.resources R4B validation alone
  strict     ``Decoder(SubjectKeyer("k"), strict=True).decode(d, position)`` for every dict

Each measurement is repeated ``--repeats`` times, interleaved (the order rotates every round, so drift in machine
speed hits all of them alike), after one untimed warm-up on a tiny feed; the median is reported.

    python -m bench.ingest_throughput [--days 120] [--volume 1] [--repeats 5] [--json] [--profile 5]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson
from fhir.resources.R4B import get_fhir_model_class

from ingest import Decoder, SubjectKeyer, load
from vigil.domain import DeadLetter, Position
from vigil.pipeline import Pipeline
from vigil.settings import load_settings
from vigil.simulator import simulate

FAST_TARGET_RATE, FAST_TARGET_RATIO, STRICT_TARGET_RATIO = 100_000, 0.25, 0.80


# --- the measured operations: each takes the prepared input and returns how many resources it handled ---------------

def run_orjson(files: list[Path]) -> int:
    n = 0
    for file in files:
        with open(file, "rb") as lines:
            for line in lines:
                orjson.loads(line)
                n += 1
    return n


def run_ingest(files: list[Path]) -> int:
    result = load(files, Decoder(SubjectKeyer("k")))
    if result.dead_letters:  # a benchmark that silently rejects its input measures the wrong thing
        raise SystemExit(f"ingest rejected {len(result.dead_letters)} resources: {result.dead_letters[0].reason}")
    return sum(result.accepted.values()) + sum(result.ignored.values())


def run_pipeline(files: list[Path]) -> int:
    result = Pipeline(load_settings()).run_paths(files)
    if result.dead_letters:
        raise SystemExit(f"pipeline rejected {len(result.dead_letters)} resources: {result.dead_letters[0].reason}")
    return sum(result.accepted.values()) + sum(result.ignored.values())


def run_validate(sample: list[tuple[Position, dict]]) -> int:
    for _, resource in sample:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return len(sample)


def run_strict(sample: list[tuple[Position, dict]]) -> int:
    decoder = Decoder(SubjectKeyer("k"), strict=True)
    for position, resource in sample:
        if isinstance(decoder.decode(resource, position), DeadLetter):
            raise SystemExit(f"strict decode rejected {position}; the feed must validate for a fair comparison")
    return len(sample)


# --- input and machine --------------------------------------------------------------------------------------------

def make_feed(out: Path, days: int, volume: float) -> list[Path]:
    simulate("stable", out, seed=7, days=days, volume=volume)
    return sorted(out.glob("*.ndjson"))  # ground_truth.json is not FHIR input: leave it out


def strict_sample(files: list[Path], size: int) -> list[tuple[Position, dict]]:
    """Every k-th line of the feed, so the mix of resource types matches the whole feed."""
    lines = [(Position(str(f), i), line) for f in files for i, line in enumerate(f.read_bytes().splitlines(), 1)]
    step = max(1, len(lines) // size)
    return [(pos, orjson.loads(line)) for pos, line in lines[::step][:size]]


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # not touched by the benchmark: recorded as the environment set them ({} = none set)
        "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")},
    }


# --- measurement --------------------------------------------------------------------------------------------------

def measure(jobs: dict[str, tuple], repeats: int) -> dict[str, dict]:
    """Time every job ``repeats`` times, interleaved with the order rotating each round; medians of the rates."""
    names, times, counts = list(jobs), {name: [] for name in jobs}, {}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            fn, arg = jobs[name]
            gc.collect()  # start each run without the previous run's garbage
            start = time.perf_counter()
            counts[name] = fn(arg)
            times[name].append(time.perf_counter() - start)
    return {name: {"resources": counts[name], "seconds": times[name],
                   "median_s": statistics.median(times[name]),
                   "per_s": counts[name] / statistics.median(times[name])} for name in names}


def profile_pipeline(files: list[Path], top: int) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(run_pipeline, files)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=120, help="simulated days of predictions (default 120, ~128k resources)")
    ap.add_argument("--volume", type=float, default=1.0, help="simulator volume multiplier (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions of each measurement (default 5)")
    ap.add_argument("--strict-sample", type=int, default=3000, help="resources in the strict-mode sample (default 3000)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also run the pipeline once under cProfile and print the top N functions by tottime")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmp:
        warm = make_feed(Path(tmp) / "warm", days=2, volume=0.2)
        files = make_feed(Path(tmp) / "feed", days=args.days, volume=args.volume)
        sample = strict_sample(files, args.strict_sample)
        fast = {"orjson.loads": (run_orjson, files), "ingest.load": (run_ingest, files),
                "pipeline": (run_pipeline, files)}
        strict = {"R4B validation": (run_validate, sample), "Decoder strict": (run_strict, sample)}
        measure({**{k: (fn, warm) for k, (fn, _) in fast.items()},  # warm-up: imports, caches, lazy model classes
                 **{k: (fn, sample[:200]) for k, (fn, _) in strict.items()}}, repeats=1)
        results = {**measure(fast, args.repeats), **measure(strict, args.repeats)}
        profile = profile_pipeline(files, args.profile) if args.profile else None

    ref, val = results["orjson.loads"]["per_s"], results["R4B validation"]["per_s"]
    ratios = {"ingest.load": results["ingest.load"]["per_s"] / ref, "pipeline": results["pipeline"]["per_s"] / ref,
              "Decoder strict": results["Decoder strict"]["per_s"] / val}
    targets = {
        "pipeline >= 100,000 resources/s": results["pipeline"]["per_s"] >= FAST_TARGET_RATE,
        "pipeline >= 25 % of orjson.loads": ratios["pipeline"] >= FAST_TARGET_RATIO,
        "ingest.load >= 100,000 resources/s": results["ingest.load"]["per_s"] >= FAST_TARGET_RATE,
        "ingest.load >= 25 % of orjson.loads": ratios["ingest.load"] >= FAST_TARGET_RATIO,
        "strict >= 80 % of R4B validation": ratios["Decoder strict"] >= STRICT_TARGET_RATIO,
    }
    report = {"machine": machine(), "feed": {"scenario": "stable", "seed": 7, "days": args.days,
                                             "volume": args.volume, "resources": results["orjson.loads"]["resources"],
                                             "strict_sample": len(sample)},
              "repeats": args.repeats, "results": results, "ratios": ratios, "targets_met": targets}
    if args.json:
        if profile:
            report["profile"] = profile
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0

    m = report["machine"]
    print(f"{m['date']}  {m['cpu_model']}  nproc={m['nproc']}  Python {m['python']}  OPENBLAS env: {m['openblas_env']}")
    print(f"feed: stable, seed 7, {args.days} days x volume {args.volume} = {report['feed']['resources']:,} resources; "
          f"strict sample {len(sample):,}; median of {args.repeats}\n")
    print(f"{'measurement':<16}{'resources':>10}{'median s':>10}{'resources/s':>13}{'ratio':>9}  reference")
    for name, r in results.items():
        reference = {"ingest.load": "orjson.loads", "pipeline": "orjson.loads", "Decoder strict": "R4B validation"}
        ratio = f"{ratios[name]:.1%}" if name in ratios else "1"
        print(f"{name:<16}{r['resources']:>10,}{r['median_s']:>10.3f}{r['per_s']:>13,.0f}{ratio:>9}  "
              f"{reference.get(name, '(reference)')}")
    print()
    for target, met in targets.items():
        print(f"  {'MET ' if met else 'MISS'}  {target}")
    if profile:
        print("\n" + profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
