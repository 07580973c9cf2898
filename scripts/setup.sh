#!/usr/bin/env bash
# Installs what Ferry needs on a Debian machine, when it is missing:
# libclang-dev (bindgen for rocksdb and wimlib-sys), libwim-dev with the
# packages its wimlib.pc names (ntfs-3g-dev, libfuse-dev), pkg-config, and the
# tools the tests and benches check against (wimtools, rsync, casync, zsync,
# b3sum, curl) or build their test hosts with (xfsprogs for a reflink
# filesystem, iproute2 for network namespaces, nftables for packet loss inside
# one), and prometheus for promtool (the /metrics tests check the exposition
# with it), and systemd for systemd-analyze, -sysusers and -tmpfiles (the
# deploy test checks the units and snippets with them), and chromium with
# chromium-driver (the status page test drives headless Chromium by
# WebDriver). Safe to run again: it installs only what is absent.
set -euo pipefail

packages=(libclang-dev libwim-dev ntfs-3g-dev libfuse-dev pkg-config wimtools rsync casync zsync b3sum xfsprogs iproute2 nftables curl prometheus systemd chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) and run again" >&2
  exit 1
fi
