#!/usr/bin/env bash
# Runs every test: unit, property and end-to-end (real site processes, real
# RocksDB, real WIMs made by wimlib's tools). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --locked -p ferry-cli
cargo test --locked --workspace "$@"
