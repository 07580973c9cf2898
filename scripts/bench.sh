#!/usr/bin/env bash
# Runs the benchmarks: criterion micro-benches (chunking, hashing) and the
# end-to-end comparison with b3sum, casync and rsync. Results: BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --locked -p ferry-cli
cargo bench --locked -p ferry-benches "$@"
