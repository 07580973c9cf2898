#!/usr/bin/env bash
# Runs every test: unit, property and end-to-end (real site processes, real
# RocksDB, real WIMs made by wimlib's tools). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
# One command builds everything: `cargo test` also builds the `ferry` binary
# (crates/cli has an integration test) and `ferry-fixture`. Other cargo
# invocations (`build -p …`) resolve features differently and would compile
# RocksDB's C++ once more.
cargo test --locked --workspace "$@"
