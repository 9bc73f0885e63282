#!/usr/bin/env bash
# Coverage-guided fuzzing of the stream decoders and the control parser (libFuzzer through
# libfuzzer-sys, built on the stable toolchain with rustc's sancov pass; see README, "Fuzzing").
#
# Usage:
#   bash tests/fuzz/soak.sh [SECONDS_PER_TARGET] [TARGET...]   soak (default 600 s, all targets)
#   bash tests/fuzz/soak.sh --smoke                            5 s per target, fresh corpus
# Targets: stream tokens ram return_path multifd tls vmstate packaged control mapped_ram
# mapped_file.
# Environment: FUZZ_RSS_MB (RSS limit, default 512), FUZZ_TIMEOUT (seconds per input,
# default 10), FUZZ_RUNS (stop a target after this many executions, default: time only),
# FUZZ_WORK (corpus and findings, default target/fuzz/work), FUZZ_FIXTURES.
#
# Seeds are cut from the QEMU fixtures at start (nothing binary is committed); the corpus
# each target grows is kept in $FUZZ_WORK/corpus/TARGET across runs. A crash, a broken
# invariant, a timeout or the RSS limit stops that target: its input is saved in
# $FUZZ_WORK/artifacts/TARGET/ and the script exits 1 after the other targets ran.
# Reproduce one with: target/fuzz/<host>/release/TARGET ARTIFACT
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
all_targets=(stream tokens ram return_path multifd tls vmstate packaged control mapped_ram
  mapped_file)

smoke=0
secs=600
if [ "${1:-}" = "--smoke" ]; then
  smoke=1; secs=5; shift
elif [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  secs=$1; shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$root/target/fuzz"
# cargo-fuzz's flags for `-s none`, all stable: coverage counters, PC table and comparison
# tracing for libFuzzer; `--target` keeps them off build scripts and proc macros.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares"
echo "fuzz: building the targets (target/fuzz)" >&2
# The helper's own lock file: the same dependency versions as the product; cargo adds
# libFuzzer's few crates to it.
cp "$root/Cargo.lock" "$root/tests/fuzz/Cargo.lock"
cargo build --release --manifest-path "$root/tests/fuzz/Cargo.toml" \
  --target "$host" --bins
bin="$CARGO_TARGET_DIR/$host/release"

if [ $smoke = 1 ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
else
  work=${FUZZ_WORK:-$root/target/fuzz/work}
fi
fixtures=${FUZZ_FIXTURES:-$root/../shared/fixtures/qemu-streams}
rm -rf "$work/seeds"
"$bin/make-seeds" "$fixtures" "$work/seeds"

failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "$work/corpus/$t" "$work/artifacts/$t" "$work/seeds/$t"
  log="$work/$t.log"
  echo "fuzz: $t for ${secs}s" >&2
  args=(-max_total_time="$secs" -rss_limit_mb="${FUZZ_RSS_MB:-512}"
    -timeout="${FUZZ_TIMEOUT:-10}" -print_final_stats=1
    -artifact_prefix="$work/artifacts/$t/")
  # The smoke run is repeatable: fixed seed, fresh corpus.
  [ $smoke = 1 ] && args+=(-seed=1)
  [ -n "${FUZZ_RUNS:-}" ] && args+=(-runs="$FUZZ_RUNS")
  rc=0
  "$bin/$t" "${args[@]}" "$work/corpus/$t" "$work/seeds/$t" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  line="$t: ${execs:-?} execs, ${rate:-?} exec/s, coverage ${cov:-?} edges"
  if [ $rc != 0 ]; then
    line+=", FAILED (exit $rc, see $log)"
    failed+=("$t")
    grep -E '^(==[0-9]+== ERROR|SUMMARY|thread .* panicked|artifact_prefix|Test unit written)' "$log" >&2 || tail -20 "$log" >&2
  fi
  summary+=("$line")
done
printf 'fuzz: %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: findings in: ${failed[*]}" >&2
  exit 1
fi
