"""vigil benchmarks: throughput measured as ratios against a reference timed in the same run (see BENCHMARKS.md)."""
