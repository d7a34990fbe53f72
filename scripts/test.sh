#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests.
# Installs what the tests need (redis-server) on Debian when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "missing: ${need_apt[*]} (install with: sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

# The tests' files (configs, keys, sockets, logs under the temporary
# directory, theirs and the gateway processes') go to one directory of this
# run, removed at the end, so runs leave nothing behind in /tmp.
TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/portico-tests.XXXXXX")
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
log="$TMPDIR/test.log"
cargo test --all-targets 2>&1 | tee "$log"

# Fuzz every target briefly (scripts/fuzz.sh; FUZZ_SECONDS per target).
# cargo-fuzz is installed when missing and this runs as root (CI, ~3 min);
# elsewhere fuzzing is skipped with a note.
if ! cargo fuzz --version >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing: cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
if cargo fuzz --version >/dev/null 2>&1; then
  ./scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
else
  echo "skipping fuzzing: cargo-fuzz is missing (cargo install cargo-fuzz --locked)" >&2
fi

# The test totals once more, last, so they close the output.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
