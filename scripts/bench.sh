#!/usr/bin/env bash
# Runs the benchmarks: criterion micro-benches (chunking, hashing) and the
# end-to-end comparisons with b3sum, casync, rsync (daemon) and zsync.
# Results: BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
# The benches drive real `ferry` processes of the release build (what an
# operator deploys; `cargo build --release` compiles RocksDB's C++ once more,
# for that profile), and the test build's for the one dev-build row of the
# datapath bench. They link no RocksDB themselves.
cargo test --locked --workspace --no-run
cargo build --locked --release --workspace
export FERRY_BIN_DEV="$CARGO_TARGET_DIR/debug/ferry"
export FERRY_BIN="$CARGO_TARGET_DIR/release/ferry"
cargo bench --locked -p ferry-benches "$@"
