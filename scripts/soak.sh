#!/usr/bin/env bash
# Soak test: a site and 4 DPs distributing and servicing 3 packages while
# SIGKILL hits the site and the DPs at random (at least 50 kills;
# FERRY_SOAK_KILLS=N for more), then checks that everything converged
# intact and what it cost (tests/tests/soak.rs). Minutes long; needs root
# (nftables counts the bytes the site sends).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
# The same cargo command as scripts/test.sh (`--test soak` alone resolves
# features differently and would compile RocksDB's C++ once more); the
# filter picks the one ignored soak test out of every test binary.
cargo test --locked --workspace -- --ignored --nocapture killed_again_and_again "$@"
