#!/usr/bin/env bash
# Installs what the tests need (as root, idempotent) and runs every test: unit tests,
# fixture tests, the interop tests against real QEMU 10.0 and 7.2, and a few seconds of
# each fuzz target.
# Usage: bash tests/run-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/install-deps.sh

# Missing QEMU or fixtures fail the run here instead of being skipped.
export QMH_REQUIRE_QEMU=1
if [ -d ../shared/fixtures/qemu-streams ]; then
  export QMH_REQUIRE_FIXTURES=1
else
  echo "run-all: ../shared/fixtures/qemu-streams is missing; fixture tests will say SKIP" >&2
fi
# The example VMM's tests need KVM (they say SKIP inside the captured test output, so say it
# here too, where it shows).
if ! { [ -r /dev/kvm ] && [ -w /dev/kvm ]; }; then
  echo "run-all: /dev/kvm is missing or not usable; the kvm_vmm tests will SKIP" >&2
else
  echo "run-all: /dev/kvm usable; the kvm_vmm tests run the example VMM on KVM"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --profile ci -- -D warnings
echo "== cargo test"
cargo test --profile ci --all-targets
cargo test --profile ci --doc
echo "== the client alone (cargo build --no-default-features)"
# What a VMM gets with `default-features = false`: the client, the protocol's types, the
# codecs and analyze; its unit tests run without the helper too.
cargo build --no-default-features
cargo clippy --no-default-features --all-targets --profile ci -- -D warnings
cargo test --profile ci --no-default-features --lib
cargo test --profile ci --no-default-features --doc
# None of the helper's heavy dependencies may come back (build dependencies included:
# bindgen is userfaultfd-sys's).
forbidden='bindgen|clang-sys|userfaultfd|userfaultfd-sys|clap|clap_builder|clap_derive|slog|slog-term|slog-json|slog-async|seccompiler|landlock|openssl|openssl-sys'
tree=$(cargo tree --no-default-features -e normal,build --prefix none)
bad=$(awk '{print $1}' <<<"$tree" | grep -Ex "$forbidden" | sort -u | tr '\n' ' ' || true)
if [ -n "$bad" ]; then
  echo "run-all: FAIL: cargo build --no-default-features pulls in: $bad" >&2
  exit 1
fi
echo "run-all: the client builds alone (none of: ${forbidden//|/ })"
echo "== fuzz smoke (5 s per target; the soak is bash tests/fuzz/soak.sh SECONDS)"
bash tests/fuzz/soak.sh --smoke
echo "== Debian package"
bash tests/package-test.sh
