//! Benches live in benches/; see BENCHMARKS.md.
