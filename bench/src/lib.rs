//! Criterion benchmarks of ferry; see docs/benchmarks.md.
