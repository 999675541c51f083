#!/bin/bash
# run-fuzz.sh FUZZER CORPUS SECONDS — run a libFuzzer target for SECONDS
# from the corpus in the repository, writing new inputs to a scratch
# directory (the repository's corpus is only read).  A crash fails the test
# and leaves the reproducer in the scratch directory, whose path is printed.
set -eu
fuzzer=$1 corpus=$2 seconds=$3
scratch=$(mktemp -d /tmp/vr-fuzz.XXXXXX)
if "$fuzzer" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$scratch/" "$scratch" "$corpus" 2>"$scratch/log"; then
    tail -n 1 "$scratch/log"
    rm -rf "$scratch"
    exit 0
fi
tail -n 40 "$scratch/log"
echo "fuzz: $(basename "$fuzzer") failed; reproducer and log in $scratch"
exit 1
