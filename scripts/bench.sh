#!/usr/bin/env bash
# Runs the benchmarks: criterion micro-benches (chunking, hashing) and the
# end-to-end comparisons with b3sum, casync, rsync (daemon) and zsync.
# Results: BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
# The benches drive the `ferry` binary of the test build (the same one
# scripts/test.sh makes); they link no RocksDB themselves.
cargo test --locked --workspace --no-run
cargo bench --locked -p ferry-benches "$@"
