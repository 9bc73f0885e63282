#!/usr/bin/env bash
# Builds the Debian package (target/debian/qemu-migration-helper_*.deb) with cargo-deb and
# checks it with lintian. Installs cargo-deb (crates.io) and lintian (Debian) when missing.
# Usage: bash packaging/build-deb.sh      (prints the path of the .deb on its last line)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
  cargo install cargo-deb --locked --quiet
fi
if ! command -v lintian >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lintian >/dev/null
  else
    echo "build-deb: lintian is missing (apt-get install lintian)" >&2; exit 1
  fi
fi

cargo deb --profile deb --quiet >/dev/null
deb=$(ls -t target/debian/qemu-migration-helper_*.deb | head -1)
# Errors fail the build; warnings are shown.
lintian --fail-on error --tag-display-limit 0 "$deb" >&2 || { echo "build-deb: lintian reports errors" >&2; exit 1; }
echo "$deb"
