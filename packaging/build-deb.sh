#!/usr/bin/env bash
# Builds the Debian package (target/debian/qemu-migration-helper_*.deb) with plain `cargo deb`
# (Cargo.toml's [package.metadata.deb] selects the stripped [profile.deb]) and checks it
# with lintian. Installs cargo-deb (crates.io) and lintian (Debian) when missing.
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

# Plain `cargo deb`: [package.metadata.deb] picks the stripped [profile.deb] itself.
cargo deb --quiet >/dev/null
deb=$(ls -t target/debian/qemu-migration-helper_*.deb | head -1)
# Errors and warnings fail the build (debian/lintian-overrides says why a tag is overridden).
lintian --fail-on error,warning --tag-display-limit 0 "$deb" >&2 ||
  { echo "build-deb: lintian reports errors or warnings" >&2; exit 1; }
echo "$deb"
