#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian 12 machine, as root; idempotent.
#  - QEMU 10.0 (qemu-system-x86 from bookworm-backports), installed.
#  - QEMU 7.2 (bookworm), unpacked beside it under $QMH_QEMU72_DIR, not installed.
#  - qemu.qmp (PyPI, pinned), QEMU's Python QMP client, for python3.
# The apt mirror is the one the machine already uses (read from its sources), so no host
# name is written here.
set -euo pipefail

QEMU72_DIR=${QMH_QEMU72_DIR:-/var/cache/qemu-migration-helper/qemu-7.2}
SOURCES=/etc/apt/sources.list.d/debian.sources
BPO_LIST=/etc/apt/sources.list.d/qmh-bookworm-backports.list

log() { echo "install-deps: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (apt-get install)"; exit 1
fi

# What building the crate needs: libclang for the userfaultfd crate's bindings; OpenSSL's
# headers and pkg-config for the openssl crate (TLS-PSK handshakes).
BUILD_DEPS=(libclang-dev libssl-dev pkg-config)

# --build-only: just those, for running the demo on a fresh machine.
if [ "${1:-}" = "--build-only" ]; then
  need=()
  for p in "${BUILD_DEPS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  exit 0
fi

mirror_uri() {
  local uri=""
  if [ -f "$SOURCES" ]; then
    # First URIs: line of a stanza whose Suites mention bookworm (not -security).
    uri=$(awk '/^URIs:/{u=$2} /^Suites:/{ if ($0 ~ /bookworm( |$)/ && u !~ /security/) {print u; exit} }' "$SOURCES")
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
  fi
  echo "$uri"
}

qemu10_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 &&
    qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10\.'
}

updated=0
apt_update() { if [ $updated = 0 ]; then apt-get update -qq; updated=1; fi; }

if ! qemu10_ok; then
  uri=$(mirror_uri)
  if [ -z "$uri" ]; then log "cannot find the machine's Debian mirror in $SOURCES"; exit 1; fi
  if [ ! -f "$BPO_LIST" ]; then
    echo "deb $uri bookworm-backports main" > "$BPO_LIST"
  fi
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null
fi
qemu10_ok || { log "QEMU 10.0 did not install"; exit 1; }
log "QEMU 10: $(qemu-system-x86_64 --version | head -1)"

if [ ! -x "$QEMU72_DIR/usr/bin/qemu-system-x86_64" ]; then
  apt_update
  tmp=$(mktemp -d); chmod 755 "$tmp"  # apt downloads as _apt
  # The bookworm (7.2) candidates, whatever backports offers.
  ver_x86=$(apt-cache madison qemu-system-x86 | awk -F'|' '$2 ~ /7\.2/ {gsub(/ /,"",$2); print $2; exit}')
  ver_common=$(apt-cache madison qemu-system-common | awk -F'|' '$2 ~ /7\.2/ {gsub(/ /,"",$2); print $2; exit}')
  if [ -z "$ver_x86" ] || [ -z "$ver_common" ]; then log "no QEMU 7.2 in the apt lists"; exit 1; fi
  (cd "$tmp" && apt-get download -qq "qemu-system-x86=$ver_x86" "qemu-system-common=$ver_common")
  mkdir -p "$QEMU72_DIR"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$QEMU72_DIR"; done
  rm -rf "$tmp"
fi
QEMU_MODULE_DIR="$QEMU72_DIR/usr/lib/x86_64-linux-gnu/qemu" \
  "$QEMU72_DIR/usr/bin/qemu-system-x86_64" --version | head -1 | sed 's/^/install-deps: QEMU 7.2: /' >&2

# Build dependencies: BUILD_DEPS above.
# Package tests: lintian checks the .deb, man-db opens the installed man page.
# Fuzz smoke: libfuzzer-sys compiles libFuzzer (C++) with g++.
# TLS unit tests: the record layer against `openssl s_server`/`s_client` (a second stack).
need=()
for p in "${BUILD_DEPS[@]}" lintian man-db g++ openssl; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# QEMU's Python QMP client (PyPI qemu.qmp), pinned: tests/interop/qmp_client.rs drives a
# migration through it. Installed for the python3 on PATH.
QEMU_QMP_VERSION=0.0.6
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('qemu.qmp') != '$QEMU_QMP_VERSION')" 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check "qemu.qmp==$QEMU_QMP_VERSION"
fi
python3 -c "import qemu.qmp" || { log "qemu.qmp did not install"; exit 1; }
log "qemu.qmp $QEMU_QMP_VERSION"
log "done"
