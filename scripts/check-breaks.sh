#!/usr/bin/env bash
# Proves the fault tests can fail: applies each deliberate break in scripts/breaks/*.patch
# (one guarantee broken on purpose) to a scratch worktree of HEAD, builds it, and runs each
# test the patch names ("Test: <test file> <test name>" lines). Every named test must fail;
# the first line of its panic is printed as the evidence.
#
#   scripts/check-breaks.sh                 # every break
#   scripts/check-breaks.sh no-dedupe ...   # some of them
#
# Not part of .ci/run (it rebuilds once per break, ~3 minutes each on 2 cores).
# Exit status: 0 if every named test failed under its break, 1 otherwise.
set -uo pipefail

root=$(git rev-parse --show-toplevel)
scratch=$(mktemp -d)
work="$scratch/capsync"
git -C "$root" worktree add --quiet --detach "$work" HEAD
cleanup() {
    git -C "$root" worktree remove --force "$work"
    rm -rf "$scratch"
}
trap cleanup EXIT
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/breaks}"
# The chaos run is seeded so that its verdict under a break is repeatable.
export CAPSYNC_CHAOS_SEED="${CAPSYNC_CHAOS_SEED:-1}"

if [ $# -gt 0 ]; then
    patches=()
    for name in "$@"; do patches+=("$root/scripts/breaks/$name.patch"); done
else
    patches=("$root"/scripts/breaks/*.patch)
fi

missed=0
for patch in "${patches[@]}"; do
    name=$(basename "$patch" .patch)
    git -C "$work" checkout --quiet -- .
    if ! git -C "$work" apply "$patch"; then
        echo "$name: the patch no longer applies; update it"
        missed=1
        continue
    fi
    echo "== $name: $(sed -n 's/^Break: //p' "$patch")"
    targets=$(sed -n 's/^Test: \([^ ]*\) .*/--test \1/p' "$patch" | sort -u)
    # shellcheck disable=SC2086 # one word per flag and target
    if ! (cd "$work" && cargo test --quiet --release $targets --no-run >"$scratch/build.log" 2>&1 </dev/null); then
        echo "   the broken tree does not build (that proves nothing):"
        tail -5 "$scratch/build.log"
        missed=1
        continue
    fi
    while read -r target test; do
        (cd "$work" && cargo test --release --test "$target" -- --exact "$test" >"$scratch/test.log" 2>&1 </dev/null)
        if ! grep -q "^test $test \.\.\. " "$scratch/test.log"; then
            echo "   NO SUCH TEST $target::$test"
            missed=1
        elif grep -q "^test $test \.\.\. ok" "$scratch/test.log"; then
            echo "   NOT CAUGHT  $target::$test"
            missed=1
        else
            evidence=$(grep -A1 -m1 "panicked at" "$scratch/test.log" | tail -1 | cut -c1-160)
            echo "   caught      $target::$test: $evidence"
        fi
    done < <(sed -n 's/^Test: //p' "$patch")
done
git -C "$work" checkout --quiet -- .
exit $missed
