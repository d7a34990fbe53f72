#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a short while: the CI smoke
# run of the fuzzers. Usage: scripts/fuzz.sh [seconds per target, default 15]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Works on stable Rust
# without a sanitizer (`-s none`), the default here; for a real fuzzing
# session use nightly with AddressSanitizer, e.g.
#   FUZZ_TOOLCHAIN=nightly FUZZ_SANITIZER=address scripts/fuzz.sh 600
# New corpus entries go to fuzz/corpus/<target> (git-ignored), seeds are read
# from fuzz/seeds/<target>; a crash stops the script with the input saved in
# fuzz/artifacts/<target>/ (reproduce: cargo fuzz run <target> <file>).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

seconds="${1:-15}"
sanitizer="${FUZZ_SANITIZER:-none}"
fuzz=(cargo)
if command -v rustup >/dev/null 2>&1; then
  fuzz+=("+${FUZZ_TOOLCHAIN:-stable}")
fi
fuzz+=(fuzz)

targets=$("${fuzz[@]}" list)
"${fuzz[@]}" build -s "$sanitizer"
for t in $targets; do
  mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
  args=(-max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1)
  if [ -f "fuzz/dict/$t.dict" ]; then
    args+=(-dict="$PWD/fuzz/dict/$t.dict")
  fi
  echo "== fuzz $t (${seconds}s)"
  "${fuzz[@]}" run -s "$sanitizer" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- "${args[@]}"
done
