#!/usr/bin/env bash
# The Debian package, as a user gets it: build it (lintian must report no error), install it
# with dpkg -i, run the installed binary, open its man page with man, and migrate from a real
# QEMU 10.0 into the installed helper (the interop test, pointed at /usr/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

deb=$(bash packaging/build-deb.sh | tail -1)
echo "package-test: built $deb"
# TLS-PSK links the system OpenSSL: cargo-deb's $auto (dpkg-shlibdeps) must have named it.
dpkg-deb -f "$deb" Depends | grep -q 'libssl3' ||
  { echo "package-test: the package does not depend on libssl3: $(dpkg-deb -f "$deb" Depends)" >&2; exit 1; }
dpkg -i "$deb" >/dev/null
installed=/usr/bin/qemu-migration-helper
"$installed" --version | grep -q "qemu-migration-helper $(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)"
echo "package-test: $("$installed" --version)"
# man must find and render the installed page.
MANPAGER=cat man -P cat qemu-migration-helper 2>/dev/null | grep -q "CONTROL PROTOCOL" ||
  { echo "package-test: man qemu-migration-helper does not show the installed page" >&2; exit 1; }
echo "package-test: man page installed and readable"
dpkg -L qemu-migration-helper | grep -q /usr/share/doc/qemu-migration-helper/copyright
QMH_HELPER_BIN="$installed" QMH_REQUIRE_QEMU=1 cargo test --profile ci --test interop qemu10_to_helper_fd
echo "package-test: QEMU 10.0 -> installed helper: ok"
