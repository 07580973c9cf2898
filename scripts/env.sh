# Sourced by the other scripts: one build folder shared by every checkout on
# this machine, so RocksDB's C++ is compiled once, not per clone.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
export FERRY_BIN="$CARGO_TARGET_DIR/debug/ferry"
