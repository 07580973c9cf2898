#!/usr/bin/env bash
# The whole job on one machine: a site and three distribution points on
# loopback (one a pull DP that takes its chunks from another), a WIM made
# on the spot, import, distribute, offline servicing in Ferry (updates
# applied with wimlib, a new revision sent to the DPs as a delta), status, history, content validation and repair on a DP, an OS
# upgrade package with one image index, a computer downloading that
# package from a DP over HTTPS with a client token, and two computers
# receiving the image from a DP in one encrypted multicast session.
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

step "Making a sample WIM (2000 files, LZX) and a software update that replaces 5% of its files"
"$fixture" pair "$work/wims" --files 2000 | tee "$work/fixture.json"
"$fixture" update "$work/updates" --tree "$work/wims/tree" --id KB9900001 --percent 5

udp_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
dp_port=$(udp_port)
https_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
peer_port=$(udp_port)

step "ferry site init / serve (operator API on 127.0.0.1:$port, DP endpoint on UDP 127.0.0.1:$dp_port)"
"$ferry" site init --data "$work/site" --listen "127.0.0.1:$port" --dp-listen "127.0.0.1:$dp_port"
"$ferry" site serve --data "$work/site" 2>"$work/site.log" &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true' EXIT
export FERRY_DATA="$work/site"
for _ in $(seq 100); do "$ferry" image list >/dev/null 2>&1 && break; sleep 0.1; done

for dp in dp1 dp2 dp3; do
  step "ferry dp add $dp, then on the DP: ferry dp init / ferry dp serve"
  token=$("$ferry" dp add "$dp")
  extra=()
  # dp1 also serves the computers being deployed, over HTTPS, and pull DPs
  # over QUIC.
  [ "$dp" = dp1 ] && extra=(--client-listen "127.0.0.1:$https_port" --client-name 127.0.0.1 --client-name localhost
                            --peer-listen "127.0.0.1:$peer_port")
  "$ferry" dp init --data "$work/$dp" --site "127.0.0.1:$dp_port" --token "$token" "${extra[@]}"
  "$ferry" dp serve --data "$work/$dp" 2>"$work/$dp.log" &
  pids+=($!)
done

step "ferry dp set dp3 --pull-from dp1: dp3 is a pull DP, it takes its chunks from dp1, not the site"
for _ in $(seq 100); do "$ferry" dp list --json | grep -c '"peer_address"' >/dev/null && break; sleep 0.1; done
"$ferry" dp set dp3 --pull-from dp1

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

step "ferry distribute --dry-run $base --dp dp1 dp2 dp3 (bytes each DP still needs)"
"$ferry" distribute --dry-run "$base" --dp dp1 dp2 dp3
step "ferry distribute $base --dp dp1; ferry group create branch; group add branch dp2 dp3; distribute --group branch"
"$ferry" distribute "$base" --dp dp1
"$ferry" group create branch
"$ferry" group add branch dp2 dp3
"$ferry" distribute "$base" --group branch
wait_installed "$base" 1
step "ferry status: dp3 got every chunk byte from dp1 (RECEIVED … from dp1), dp1 and dp2 from the site"
"$ferry" status
"$ferry" dp list

step "ferry update import (the example in deploy/ and the generated one); ferry update list"
"$ferry" update import deploy/updates/KB5031356
"$ferry" update import "$work/updates/KB9900001"
"$ferry" update list
step "ferry image updates $base: what applies to this image"
"$ferry" image updates "$base"

step "ferry image service $base --updates KB5031356,KB9900001 --distribute (Ferry's copy, wimlib, new revision)"
"$ferry" image service "$base" --updates KB5031356,KB9900001 --distribute
wait_installed "$base" 2
step "ferry status $base: the delta each DP received beside the full image"
"$ferry" status "$base"
step "ferry image history $base; ferry image updates $base; ferry jobs"
"$ferry" image history "$base"
"$ferry" image updates "$base"
"$ferry" jobs

step "Redistribution on the wire, beside the blob floor and the image size"
"$ferry" content export "$base" --out "$work/serviced-by-ferry.wim"
floor=$("$fixture" floor "$work/wims/base.wim" "$work/serviced-by-ferry.wim")
"$ferry" status "$base" --json > "$work/status.json"
python3 - "$work/status.json" "$floor" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
floor = int(sys.argv[2])
for r in rows:
    wire, got, full = r["wire_bytes"], r["bytes_done"], r["full_bytes"]
    print(f"{r['dp']}: {wire:>11,} bytes at the DP's socket ({got:,} chunk bytes) = "
          f"{wire / floor:.3f}x the blob floor ({floor:,}), {wire * 100 / full:.1f}% of the image ({full:,})")
PY

step "Each DP's copy, compared with the site's revision 2 (dp3's delta came from dp1)"
for dp in dp1 dp2 dp3; do
  f="$work/$dp/content/$base/base.wim"
  cmp "$f" "$work/serviced-by-ferry.wim" && echo "$dp: $f byte-identical"
  wimverify "$f" | tail -1
  wimdir "$f" 1 | grep -q ferry-example.txt && echo "$dp: the image holds KB5031356's file"
done

step "Content validation: a byte flipped on dp1's disk is found, and that chunk alone refetched (ferry dp validate dp1)"
python3 - "$work/dp1/content/$base/base.wim" <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(1_000_000)
    b = f.read(1)
    f.seek(1_000_000)
    f.write(bytes([b[0] ^ 1]))
PY
cmp -s "$work/dp1/content/$base/base.wim" "$work/serviced-by-ferry.wim" || echo "dp1: its copy now differs at byte 1,000,000"
"$ferry" dp validate dp1
cmp "$work/dp1/content/$base/base.wim" "$work/serviced-by-ferry.wim" && echo "dp1: byte-identical again"
"$ferry" dp set dp2 --validate-schedule "0 3 * * 0"

step "A job scheduled 3 s ahead runs by itself: ferry image service $base --optimize --at +3s"
"$ferry" image service "$base" --optimize --at +3s
sleep 5
"$ferry" jobs

step "An OS upgrade package: a setup folder whose install.wim (two images) keeps only image 2"
media="$work/media"
mkdir -p "$media/sources"
cp "$work/wims/base.wim" "$media/sources/install.wim"
wimexport "$work/serviced-by-ferry.wim" 1 "$media/sources/install.wim" "Windows 11 Enterprise (serviced)" >/dev/null
wiminfo "$media/sources/install.wim" | grep "Image Count"
head -c 200000 /dev/urandom > "$media/setup.exe"
printf '[AutoRun]\r\nopen=setup.exe\r\n' > "$media/autorun.inf"
upgrade=$("$ferry" upgrade add "$media" --name "Windows 11 23H2 Enterprise" --extract-index 2 --lang en-US)
"$ferry" upgrade list
"$ferry" distribute "$upgrade" --group branch
wait_installed "$upgrade" 1
(cd "$media" && find . -type f ! -path ./sources/install.wim | sort | xargs sha256sum) > "$work/media.sha"
(cd "$work/dp2/content/$upgrade" && sha256sum -c --quiet "$work/media.sha") && echo "dp2: every other file of the setup folder, byte for byte"
wiminfo "$work/dp2/content/$upgrade/sources/install.wim" | grep -E "Image Count|^Name"

step "A computer being deployed downloads the upgrade package from dp1 over HTTPS"
"$ferry" distribute "$upgrade" --dp dp1
wait_installed "$upgrade" 1
client_token=$("$ferry" client token create --name lab-pcs --expires 30d)
"$ferry" client token list
"$ferry" client fetch --dp "https://127.0.0.1:$https_port" "$upgrade" --out "$work/client" \
  --token "$client_token" --ca "$work/site/ca.pem"
(cd "$work/client" && sha256sum -c --quiet "$work/media.sha") && echo "client: every file of the setup folder, byte for byte"
echo "curl, a range of setup.exe with the same token:"
curl -sS --cacert "$work/site/ca.pem" -H "Authorization: Bearer $client_token" -r 0-15 \
  -D - -o /dev/null "https://127.0.0.1:$https_port/content/$upgrade/setup.exe" | grep -iE "^HTTP|content-range|etag"
echo "without a token:"
curl -sS --cacert "$work/site/ca.pem" -o /dev/null -w "HTTP %{http_code}\n" "https://127.0.0.1:$https_port/content/$upgrade/"

step "Two computers receive $base from dp1 in one encrypted multicast session"
"$ferry" image multicast "$base" --allow --encrypt
"$ferry" dp multicast dp1 --enable --interface 127.0.0.1 --min-clients 2 --start-delay 20s --rate 40M
# The DP takes its settings with its next assignments: wait until it lists the package.
for _ in $(seq 100); do
  curl -sS --cacert "$work/site/ca.pem" -H "Authorization: Bearer $client_token" \
    "https://127.0.0.1:$https_port/multicast/" | grep -q "\"$base\"" && break
  sleep 0.2
done
mc_pids=()
for c in pc1 pc2; do
  "$ferry" client multicast --dp "https://127.0.0.1:$https_port" "$base" --out "$work/$c" \
    --token "$client_token" --ca "$work/site/ca.pem" --interface 127.0.0.1 >"$work/$c.out" &
  mc_pids+=($!)
done
wait "${mc_pids[@]}"
cat "$work/pc1.out" "$work/pc2.out"
rev=$("$ferry" status "$base" --dp dp1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["revision"])')
"$ferry" content export "$base" --revision "$rev" --out "$work/mc-expected.wim"
for c in pc1 pc2; do
  cmp "$work/$c"/*.wim "$work/mc-expected.wim"
  echo "$c: revision $rev of the image, byte for byte"
done
echo "the DP's session (GET /multicast/):"
curl -sS --cacert "$work/site/ca.pem" -H "Authorization: Bearer $client_token" \
  "https://127.0.0.1:$https_port/multicast/" | python3 -c '
import json, sys
for s in json.load(sys.stdin)["sessions"][:1]:
    print("  session %s: %d clients, %d done, %d passes, %s bytes sent for a %s-byte image (%.3fx), encrypted: %s" % (
        s["session"], s["clients_joined"], s["clients_done"], s["passes"], format(s["bytes_sent"], ","),
        format(s["package_bytes"], ","), s["bytes_sent"] / s["package_bytes"], s["encrypted"]))'

step "Done. Files are in $work (logs: $work/site.log, $work/dp1.log, $work/dp2.log, $work/dp3.log)"
