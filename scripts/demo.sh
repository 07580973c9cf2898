#!/usr/bin/env bash
# The whole job on one machine: a site and two distribution points on
# loopback, a WIM made on the spot, import, distribute, service a copy,
# refresh (redistribute the delta), status.
# Installs what it needs first. Leaves its files in $FERRY_DEMO_DIR (default:
# a fresh folder under /tmp) and stops the site when done.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
# The same build as scripts/test.sh (it makes `ferry` and `ferry-fixture`),
# so RocksDB's C++ is compiled once for both.
cargo test --locked -q --workspace --no-run
ferry="$CARGO_TARGET_DIR/debug/ferry"
fixture="$CARGO_TARGET_DIR/debug/ferry-fixture"

work="${FERRY_DEMO_DIR:-$(mktemp -d /tmp/ferry-demo.XXXXXX)}"
mkdir -p "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 4480)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Making a sample WIM (2000 files, LZX) and a serviced copy (wimupdate: files replaced, patched, added, deleted)"
"$fixture" pair "$work/wims" --files 2000 | tee "$work/fixture.json"

udp_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
dp_port=$(udp_port)

step "ferry site init / serve (operator API on 127.0.0.1:$port, DP endpoint on UDP 127.0.0.1:$dp_port)"
"$ferry" site init --data "$work/site" --listen "127.0.0.1:$port" --dp-listen "127.0.0.1:$dp_port"
"$ferry" site serve --data "$work/site" 2>"$work/site.log" &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true' EXIT
export FERRY_DATA="$work/site"
for _ in $(seq 100); do "$ferry" image list >/dev/null 2>&1 && break; sleep 0.1; done

for dp in dp1 dp2; do
  step "ferry dp add $dp, then on the DP: ferry dp init / ferry dp serve"
  token=$("$ferry" dp add "$dp")
  "$ferry" dp init --data "$work/$dp" --site "127.0.0.1:$dp_port" --token "$token"
  "$ferry" dp serve --data "$work/$dp" 2>"$work/$dp.log" &
  pids+=($!)
done

step "ferry image add base.wim"
base=$("$ferry" image add "$work/wims/base.wim" --version 23H2 --comment "golden image")
"$ferry" image list

# Waits until every DP row of package $1 is installed at revision $2.
wait_installed() {
  for _ in $(seq 600); do
    if "$ferry" status "$1" --json | python3 -c '
import json, sys
rows = json.load(sys.stdin)
want = int(sys.argv[1])
failed = [r for r in rows if r["state"] == "failed"]
if failed: print("failed:", failed[0]["dp"], failed[0]["error"], file=sys.stderr)
sys.exit(0 if rows and all(r["state"] == "installed" and r["revision"] == want for r in rows) else 1)' "$2"; then
      return 0
    fi
    sleep 0.2
  done
  echo "timed out waiting for $1 r$2; see $work/*.log" >&2
  return 1
}

step "ferry distribute --dry-run $base --dp dp1 dp2 (bytes each DP still needs)"
"$ferry" distribute --dry-run "$base" --dp dp1 dp2
step "ferry distribute $base --dp dp1; ferry group create branch; group add branch dp2; distribute --group branch"
"$ferry" distribute "$base" --dp dp1
"$ferry" group create branch
"$ferry" group add branch dp2
"$ferry" distribute "$base" --group branch
wait_installed "$base" 1
"$ferry" status
"$ferry" dp list

step "Offline servicing done on a copy (wimupdate); ferry content refresh $base --source serviced.wim"
"$ferry" content refresh "$base" --source "$work/wims/serviced.wim"
wait_installed "$base" 2
step "ferry status $base: the delta each DP received beside the full image"
"$ferry" status "$base"
"$ferry" image show "$base" | sed -n '1,16p'

step "Redistribution on the wire, beside the blob floor and the image size"
"$ferry" status "$base" --json > "$work/status.json"
python3 - "$work/status.json" "$work/fixture.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
floor = json.load(open(sys.argv[2]))["blob_floor"]
for r in rows:
    wire, got, full = r["wire_bytes"], r["bytes_done"], r["full_bytes"]
    print(f"{r['dp']}: {wire:>11,} bytes at the DP's socket ({got:,} chunk bytes) = "
          f"{wire / floor:.3f}x the blob floor ({floor:,}), {wire * 100 / full:.1f}% of the image ({full:,})")
PY

step "Each DP's copy, compared with the serviced image"
for dp in dp1 dp2; do
  f="$work/$dp/content/$base/base.wim"
  cmp "$f" "$work/wims/serviced.wim" && echo "$dp: $f byte-identical"
  wimverify "$f" | tail -1
done

step "Done. Files are in $work (logs: $work/site.log, $work/dp1.log, $work/dp2.log)"
