#!/usr/bin/env bash
# The whole job on one machine: a site on loopback, a WIM made on the spot,
# import, service a copy, import that, show the dedup, export and compare.
# Installs what it needs first. Leaves its files in $FERRY_DEMO_DIR (default:
# a fresh folder under /tmp) and stops the site when done.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --locked -q -p ferry-cli -p ferry-tests --bins
ferry="$CARGO_TARGET_DIR/debug/ferry"
fixture="$CARGO_TARGET_DIR/debug/ferry-fixture"

work="${FERRY_DEMO_DIR:-$(mktemp -d /tmp/ferry-demo.XXXXXX)}"
mkdir -p "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 4480)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Making a sample WIM (2000 files, LZX) and a serviced copy (wimupdate: files replaced, patched, added, deleted)"
"$fixture" pair "$work/wims" --files 2000 | tee "$work/fixture.json"

step "ferry site init / serve"
"$ferry" site init --data "$work/site" --listen "127.0.0.1:$port"
"$ferry" site serve --data "$work/site" 2>"$work/site.log" &
site_pid=$!
trap 'kill $site_pid 2>/dev/null; wait $site_pid 2>/dev/null || true' EXIT
export FERRY_DATA="$work/site"
for _ in $(seq 100); do "$ferry" image list >/dev/null 2>&1 && break; sleep 0.1; done

step "ferry image add base.wim"
base=$("$ferry" image add "$work/wims/base.wim" --version 23H2 --comment "golden image")
step "ferry image add serviced.wim (the same image after offline servicing)"
serviced=$("$ferry" image add "$work/wims/serviced.wim" --name "Windows 11 Enterprise (serviced)" --version 23H2.1)

step "ferry image list"
"$ferry" image list
step "ferry image show $serviced"
"$ferry" image show "$serviced"

step "Dedup: bytes newly stored for the serviced image, beside its blob floor"
new=$("$ferry" image show "$serviced" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["revisions"][-1]["stats"]["new_bytes"])')
floor=$(python3 -c 'import json; print(json.load(open("'"$work/fixture.json"'"))["blob_floor"])')
size=$(stat -c %s "$work/wims/serviced.wim")
python3 - "$new" "$floor" "$size" <<'PY'
import sys
new, floor, size = map(int, sys.argv[1:])
print(f"serviced image {size:>12,} bytes")
print(f"blob floor     {floor:>12,} bytes (new resources + metadata + tables, from wiminfo)")
print(f"ferry stored   {new:>12,} bytes = {new/floor:.3f}x the floor, {new*100/size:.2f}% of the image")
PY

step "ferry content export $serviced, compared with the original"
"$ferry" content export "$serviced" --out "$work/exported.wim"
cmp "$work/exported.wim" "$work/wims/serviced.wim" && echo "byte-identical"
wimverify "$work/exported.wim" | tail -1

step "ferry content verify"
"$ferry" content verify

step "Done. Files are in $work (site log: $work/site.log)"
