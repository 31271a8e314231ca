"""Ingest throughput, as ratios against references timed in the same run (DESIGN.md "Performance targets").

Fast path, on a simulated "stable" feed (the NDJSON files only):
  reference  plain ``orjson.loads`` of every line of the files
  ingest     ``ingest.load(files, Decoder(SubjectKeyer("k")))``            read + decode + de-identify
  pipeline   ``Pipeline(load_settings()).run_paths(files)``                 + reference data, label join, detectors
Strict mode, on an evenly spaced sample of the same feed, already parsed (parsing is not timed):
  reference  ``get_fhir_model_class(t).model_validate(d)`` for every dict   fhir.resources R4B validation alone
  strict     ``Decoder(SubjectKeyer("k"), strict=True).decode(d, position)`` for every dict

Each measurement is repeated ``--repeats`` times, interleaved (the order rotates every round, so drift in machine
speed hits all of them alike), after one untimed warm-up on a tiny feed; the median is reported. Wall time
(``perf_counter``) and the process's CPU time (``process_time``) are both kept: on a shared machine the CPU time is
the better measure of "one core", because time spent waiting for the CPU is not counted.

``--baseline REV`` adds "before" measurements in the same run on the same file: the ``ingest`` package as it was at
git revision REV is loaded beside the current one (as ``ingest_at_<rev>``) and timed alone and inside the pipeline.
``--stages`` runs the pipeline once under cProfile and attributes all of its time to stages (read+parse, decode,
de-identification, reference data, ontology, join, streams, detectors, ...); ``--gc-experiment`` also times the
pipeline with Python's cycle collector paused for the whole run, a change recommended for ``vigil/pipeline.py``.

    python -m bench.ingest_throughput [--days 120] [--volume 1] [--repeats 5] [--json] [--profile 5]
                                      [--baseline 7670d9b] [--stages] [--gc-experiment]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib
import io
import os
import platform
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import orjson
from fhir.resources.R4B import get_fhir_model_class

from ingest import Decoder, SubjectKeyer, load
from ingest.load import cyclic_gc_paused
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


PIPELINE_SPLIT: dict[str, list[float]] = defaultdict(list)
"""Wall seconds of each timed pipeline run spent in ``ingest.load`` and in ``Pipeline.ingest`` (the rest), by job."""


def run_pipeline(files: list[Path], ingest_pkg: ModuleType | None = None, split: str = "pipeline") -> int:
    """``Pipeline.run_paths``, in its two halves so their times can be reported: ``load`` then ``Pipeline.ingest``.

    With ``ingest_pkg`` (a baseline ``ingest`` package), the pipeline reads and decodes with that package instead.
    """
    pipeline = Pipeline(load_settings())
    pkg = ingest_pkg or sys.modules["ingest"]
    if ingest_pkg is not None:
        settings = pipeline.settings
        pipeline.decoder = pkg.Decoder(pkg.SubjectKeyer(settings.subject_key), policy=settings.deid_policy)
    start = time.perf_counter()
    loaded = pkg.load(list(files), pipeline.decoder)
    middle = time.perf_counter()
    result = pipeline.ingest(loaded)
    PIPELINE_SPLIT[split + " load"].append(middle - start)
    PIPELINE_SPLIT[split + " process"].append(time.perf_counter() - middle)
    if result.dead_letters:
        raise SystemExit(f"pipeline rejected {len(result.dead_letters)} resources: {result.dead_letters[0].reason}")
    return sum(result.accepted.values()) + sum(result.ignored.values())


def run_pipeline_gc_paused(files: list[Path]) -> int:
    """The pipeline with Python's cycle collector off for the whole run (``ingest.load.cyclic_gc_paused``), as
    recommended for ``Pipeline.run_paths``; the same work as ``run_pipeline``."""
    with cyclic_gc_paused():
        return run_pipeline(files, split="pipeline, gc paused")


def baseline_ingest(rev: str, into: Path) -> ModuleType:
    """The ``ingest`` package as committed at ``rev``, importable beside the current one as ``ingest_at_<rev>``.

    Its modules are copied from ``git show`` with their ``ingest`` imports renamed; everything else (vigil.domain,
    orjson) is shared, so both produce the same record types and the pipeline can consume either.
    """
    repo = Path(__file__).resolve().parents[1]
    name = "ingest_at_" + re.sub(r"\W", "_", rev)
    package = into / name
    package.mkdir(parents=True)
    try:
        listing = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:ingest"], cwd=repo, check=True,
                                 capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"--baseline {rev}: cannot list ingest/ at that revision in {repo} ({exc}); give a commit "
                         "of this repository, e.g. 7670d9b") from None
    for file in (f for f in listing if f.endswith(".py")):
        text = subprocess.run(["git", "show", f"{rev}:ingest/{file}"], cwd=repo, check=True, capture_output=True,
                              text=True).stdout
        (package / file).write_text(re.sub(r"^(\s*)(from|import) ingest\b", rf"\1\2 {name}", text, flags=re.M))
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def run_ingest_with(pkg: ModuleType):
    def run(files: list[Path]) -> int:
        result = pkg.load(files, pkg.Decoder(pkg.SubjectKeyer("k")))
        if result.dead_letters:
            raise SystemExit(f"baseline ingest rejected {len(result.dead_letters)}: {result.dead_letters[0].reason}")
        return sum(result.accepted.values()) + sum(result.ignored.values())
    return run


def same_output(files: list[Path], pkg: ModuleType) -> bool:
    """The baseline and the current ``ingest.load`` decode the feed to equal records, counts and strip counts."""
    before = pkg.load(files, pkg.Decoder(pkg.SubjectKeyer("k")))
    after = load(files, Decoder(SubjectKeyer("k")))
    return (before.records == after.records and before.dead_letters == after.dead_letters
            and before.accepted == after.accepted and before.ignored == after.ignored
            and before.stripped == after.stripped)


def run_validate(sample: list[tuple[Position, dict]]) -> int:
    for _, resource in sample:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return len(sample)


def run_strict(sample: list[tuple[Position, dict]], pkg: ModuleType | None = None) -> int:
    pkg = pkg or sys.modules["ingest"]
    decoder = pkg.Decoder(pkg.SubjectKeyer("k"), strict=True)
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
    """Time every job ``repeats`` times, interleaved with the order rotating each round; medians of the rates.

    Wall time (``seconds``, ``per_s``) and CPU time of this process (``cpu_seconds``, ``cpu_per_s``)."""
    names, times, cpu, counts = list(jobs), {name: [] for name in jobs}, {name: [] for name in jobs}, {}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            fn, arg = jobs[name]
            gc.collect()  # start each run without the previous run's garbage
            start, start_cpu = time.perf_counter(), time.process_time()
            counts[name] = fn(arg)
            cpu[name].append(time.process_time() - start_cpu)
            times[name].append(time.perf_counter() - start)
    return {name: {"resources": counts[name], "seconds": times[name], "cpu_seconds": cpu[name],
                   "median_s": statistics.median(times[name]),
                   "per_s": counts[name] / statistics.median(times[name]),
                   "cpu_median_s": statistics.median(cpu[name]),
                   "cpu_per_s": counts[name] / statistics.median(cpu[name])} for name in names}


def profile_pipeline(files: list[Path], top: int) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(run_pipeline, files)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


STAGES = (  # (stage, file path fragment, function name or None for the whole file); first match wins
    ("reference data (Pipeline._apply_reference)", "vigil/pipeline.py", "_apply_reference"),
    ("dedupe (Pipeline._is_duplicate)", "vigil/pipeline.py", "_is_duplicate"),
    ("read + parse (ingest/reader.py, orjson)", "ingest/reader.py", None),
    ("read + parse (ingest/reader.py, orjson)", "~", "<built-in method orjson.loads>"),
    ("de-identification (ingest/deid.py, HMAC)", "ingest/deid.py", None),
    ("de-identification (ingest/deid.py, HMAC)", "hmac.py", None),
    ("decode (ingest/decode.py, ingest/load.py)", "ingest/decode.py", None),
    ("decode (ingest/decode.py, ingest/load.py)", "ingest/load.py", None),
    ("ontology mapping (ontology/mapper.py, conceptmap, units)", "ontology/mapper.py", None),
    ("ontology mapping (ontology/mapper.py, conceptmap, units)", "ontology/conceptmap.py", None),
    ("ontology mapping (ontology/mapper.py, conceptmap, units)", "ontology/units.py", None),
    ("subgroups (ontology/subgroups.py)", "ontology/subgroups.py", None),
    ("outcome definitions (ontology/outcomes.py, called by the join)", "ontology/outcomes.py", None),
    ("label join (monitors/join.py)", "monitors/join.py", None),
    ("stream observe/advance (monitors/streams.py)", "monitors/streams.py", None),
    ("detectors (monitors/detectors.py)", "monitors/detectors.py", None),
    ("thresholds (monitors/calibrate.py, budget.py)", "monitors/calibrate.py", None),
    ("thresholds (monitors/calibrate.py, budget.py)", "monitors/budget.py", None),
    ("alerts (alerts/)", "/alerts/", None),
    ("tickets (retrain_trigger/)", "/retrain_trigger/", None),
    ("settings, concept maps, PCCP (start-up)", "vigil/settings.py", None),
    ("settings, concept maps, PCCP (start-up)", "pydantic", None),
    ("settings, concept maps, PCCP (start-up)", "yaml", None),
    ("pipeline wiring (vigil/pipeline.py: sort, dispatch, windows)", "vigil/pipeline.py", None),
)


def _stage_of(func: tuple[str, int, str]) -> str | None:
    file, _, name = func
    for stage, fragment, function in STAGES:
        if fragment in file and (function is None or function == name or function in name):
            return stage
    return None


def stage_profile(files: list[Path]) -> dict:
    """One pipeline run under cProfile; every function's own time (tottime) charged to a stage.

    A function outside the stage files (a builtin such as ``dict.get``, a stdlib helper, a dataclass ``__init__``) is
    charged to the stages of its callers, split by the time it spent for each caller (pstats keeps that per caller);
    a caller that is itself outside goes to the stage of its own largest caller. Profiling inflates calls, so the
    shares, not the seconds, are what to read.
    """
    profiler = cProfile.Profile()
    profiler.runcall(run_pipeline, files, None, "profiled")
    stats = pstats.Stats(profiler).stats  # func -> (cc, nc, tt, ct, callers{caller: (cc, nc, tt, ct)})
    memo: dict[tuple, str] = {}

    def owner(func: tuple, depth: int = 0) -> str:
        if func in memo:
            return memo[func]
        stage = _stage_of(func)
        if stage is None:
            callers = stats.get(func, (0, 0, 0, 0, {}))[4]
            if not callers or depth > 30:
                stage = "other (" + func[2][:40] + ")"
            else:
                top = max(callers, key=lambda c: callers[c][3])
                stage = owner(top, depth + 1)
        memo[func] = stage
        return stage

    shares: dict[str, float] = defaultdict(float)
    for func, (_, _, tottime, _, callers) in stats.items():
        if _stage_of(func) is not None or not callers:
            shares[owner(func)] += tottime
        else:
            for caller, (_, _, caller_tt, _) in callers.items():
                shares[owner(caller)] += caller_tt
    total = sum(shares.values())
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    return {"total_profiled_s": total, "stages": [{"stage": k, "seconds": v, "share": v / total} for k, v in ranked]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=120, help="simulated days of predictions (default 120, ~128k resources)")
    ap.add_argument("--volume", type=float, default=1.0, help="simulator volume multiplier (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions of each measurement (default 5)")
    ap.add_argument("--strict-repeats", type=int, default=9,
                    help="timed repetitions of the strict-mode measurements, half a second each (default 9)")
    ap.add_argument("--strict-sample", type=int, default=3000, help="resources in the strict-mode sample (default 3000)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also run the pipeline once under cProfile and print the top N functions by tottime")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--baseline", metavar="REV", help="also time the ingest package as of git revision REV "
                    "(alone and inside the pipeline), in the same run on the same file")
    ap.add_argument("--stages", action="store_true", help="attribute one profiled pipeline run's time to stages")
    ap.add_argument("--gc-experiment", action="store_true",
                    help="also time the pipeline with the cycle collector paused for the whole run")
    ap.add_argument("--skip-strict", action="store_true", help="leave out the strict-mode measurements")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmp:
        warm = make_feed(Path(tmp) / "warm", days=2, volume=0.2)
        files = make_feed(Path(tmp) / "feed", days=args.days, volume=args.volume)
        sample = strict_sample(files, args.strict_sample)
        fast = {"orjson.loads": (run_orjson, files), "ingest.load": (run_ingest, files),
                "pipeline": (run_pipeline, files)}
        equal = None
        if args.baseline:
            base = baseline_ingest(args.baseline, Path(tmp) / "baseline")
            equal = same_output(files, base)
            if not equal:
                raise SystemExit(f"ingest at {args.baseline} and the current ingest decode the feed differently")
            fast[f"ingest.load @{args.baseline}"] = (run_ingest_with(base), files)
            fast[f"pipeline @{args.baseline}"] = (
                lambda f, b=base, s=f"pipeline @{args.baseline}": run_pipeline(f, b, s), files)
        if args.gc_experiment:
            fast["pipeline, gc paused"] = (run_pipeline_gc_paused, files)
        strict = {} if args.skip_strict else {"R4B validation": (run_validate, sample),
                                              "Decoder strict": (run_strict, sample)}
        if strict and args.baseline:
            strict[f"Decoder strict @{args.baseline}"] = (lambda smp, b=base: run_strict(smp, b), sample)
        measure({**{k: (fn, warm) for k, (fn, _) in fast.items()},  # warm-up: imports, caches, lazy model classes
                 **{k: (fn, sample[:200]) for k, (fn, _) in strict.items()}}, repeats=1)
        # One untimed pipeline run on the full feed: it computes the detector thresholds of this feed's streams
        # (exact ARLs, kept in process-wide lru_caches), so no pipeline job pays that one-off cost in its first round.
        run_pipeline(files, split="warm-up")
        PIPELINE_SPLIT.clear()
        results = {**measure(fast, args.repeats), **(measure(strict, args.strict_repeats) if strict else {})}
        profile = profile_pipeline(files, args.profile) if args.profile else None
        stages = stage_profile(files) if args.stages else None

    ref, ref_cpu = results["orjson.loads"]["per_s"], results["orjson.loads"]["cpu_per_s"]
    references = {name: "orjson.loads" for name in fast if name != "orjson.loads"}
    references.update({name: "R4B validation" for name in strict if name.startswith("Decoder strict")})
    ratios = {name: results[name]["per_s"] / results[r]["per_s"] for name, r in references.items()}
    cpu_ratios = {name: results[name]["cpu_per_s"] / results[r]["cpu_per_s"] for name, r in references.items()}
    split = {name: statistics.median(v) for name, v in PIPELINE_SPLIT.items() if not name.startswith("profiled")}
    targets = {
        "pipeline >= 100,000 resources/s": results["pipeline"]["per_s"] >= FAST_TARGET_RATE,
        "pipeline >= 25 % of orjson.loads": ratios["pipeline"] >= FAST_TARGET_RATIO,
        "ingest.load >= 100,000 resources/s": results["ingest.load"]["per_s"] >= FAST_TARGET_RATE,
        "ingest.load >= 25 % of orjson.loads": ratios["ingest.load"] >= FAST_TARGET_RATIO,
    }
    if strict:
        targets["strict >= 80 % of R4B validation"] = ratios["Decoder strict"] >= STRICT_TARGET_RATIO
    report = {"machine": machine(), "feed": {"scenario": "stable", "seed": 7, "days": args.days,
                                             "volume": args.volume, "resources": results["orjson.loads"]["resources"],
                                             "strict_sample": len(sample)},
              "repeats": args.repeats, "results": results, "ratios": ratios, "cpu_ratios": cpu_ratios,
              "pipeline_split_median_s": split, "targets_met": targets}
    if args.baseline:
        kinds = [k for k in ("ingest.load", "pipeline", "Decoder strict") if f"{k} @{args.baseline}" in results]
        report["baseline"] = {"rev": args.baseline, "same_output": equal, "speedup_wall": {
            k: results[k]["per_s"] / results[f"{k} @{args.baseline}"]["per_s"] for k in kinds}, "speedup_cpu": {
            k: results[k]["cpu_per_s"] / results[f"{k} @{args.baseline}"]["cpu_per_s"] for k in kinds}}
    if stages:
        report["stages"] = stages
    if args.json:
        if profile:
            report["profile"] = profile
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0

    m = report["machine"]
    print(f"{m['date']}  {m['cpu_model']}  nproc={m['nproc']}  Python {m['python']}  OPENBLAS env: {m['openblas_env']}")
    print(f"feed: stable, seed 7, {args.days} days x volume {args.volume} = {report['feed']['resources']:,} resources; "
          f"strict sample {len(sample):,}; median of {args.repeats}\n")
    print(f"{'measurement':<28}{'resources':>10}{'median s':>10}{'resources/s':>13}{'ratio':>8}"
          f"{'CPU s':>9}{'CPU res/s':>12}{'CPU ratio':>10}  reference")
    for name, r in results.items():
        ratio = f"{ratios[name]:.1%}" if name in ratios else "1"
        cpu_ratio = f"{cpu_ratios[name]:.1%}" if name in cpu_ratios else "1"
        print(f"{name:<28}{r['resources']:>10,}{r['median_s']:>10.3f}{r['per_s']:>13,.0f}{ratio:>8}"
              f"{r['cpu_median_s']:>9.3f}{r['cpu_per_s']:>12,.0f}{cpu_ratio:>10}  {references.get(name, '(reference)')}")
    print("\npipeline runs split (median wall s): " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
    if args.baseline:
        b = report["baseline"]
        print(f"against {args.baseline} (same output: {b['same_output']}): " + ", ".join(
            f"{k} x{b['speedup_wall'][k]:.2f} wall, x{b['speedup_cpu'][k]:.2f} CPU" for k in b["speedup_wall"]))
    print()
    for target, met in targets.items():
        print(f"  {'MET ' if met else 'MISS'}  {target}")
    if stages:
        print(f"\nwhere a profiled pipeline run spends its time ({stages['total_profiled_s']:.1f} s under cProfile):")
        for row in stages["stages"]:
            print(f"  {row['share']:>6.1%}  {row['seconds']:>7.2f} s  {row['stage']}")
    if profile:
        print("\n" + profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
