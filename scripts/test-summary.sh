#!/bin/bash
# test-summary.sh [TESTLOG.json…] — sum meson test results.
#
# Reads meson's testlog.json files (one JSON object per line; default:
# build*/meson-logs/*.json under the current directory: testlog.json, and
# e.g. fuzzlog.json from `meson test --logbase fuzzlog`), lists the
# failed and skipped tests (a skipped test with the reason it printed), then
# prints ONE closing line:
#     N passed, N failed, N skipped
# Exit status: 0 if nothing failed, 1 otherwise, 2 if there was nothing to
# read.  A named log that does not exist counts as one failed test.
set -euo pipefail

if ! command -v jq >/dev/null 2>&1; then
    echo "test-summary: jq not found" >&2
    exit 2
fi

if [ $# -eq 0 ]; then
    shopt -s nullglob
    set -- build*/meson-logs/*.json
    shopt -u nullglob
fi
if [ $# -eq 0 ]; then
    echo "test-summary: no testlog.json found" >&2
    exit 2
fi

# One TSV row per test: run, result, name, reason.  A test log that was
# named but does not exist (its run never happened: setup or build failed)
# counts as one failure.
rows=$(
    for log in "$@"; do
        run=${log%/meson-logs/*.json}
        run=${run##*/}
        if [ ! -e "$log" ]; then
            printf '%s\tERROR\t(no test log %s: the run did not happen)\t\n' \
                "$run" "$log"
            continue
        fi
        jq -r --arg run "$run" '
            def reason:
              ((.stdout // "") + "\n" + (.stderr // ""))
              | split("\n") | map(select(test("\\S"))) as $l
              | ([$l[] | select(test("skip"; "i"))] | first) // ($l | last) // "";
            # A failure: the lines that say why (the test'"'"'s FAIL line,
            # a signal a daemon logged, a sanitizer report), so the end
            # of a CI log, often all that is shown, names the cause.
            def why:
              ((.stdout // "") + "\n" + (.stderr // ""))
              | split("\n")
              | map(select(test("FAIL:|signal [0-9]+ from|Sanitizer|runtime error|Timeout|timed out")))
              | .[:4] | map(.[:300]) | join("\u001f");
            [$run, .result, .name,
             (if .result == "SKIP" then reason
              elif (.result | test("^(FAIL|TIMEOUT|ERROR|UNEXPECTEDPASS)$")) then why
              else "" end)
             | gsub("[\t\r]"; " ")] | @tsv' "$log"
    done
)

count() { # result regex
    if [ -z "$rows" ]; then
        echo 0
        return
    fi
    awk -F'\t' -v re="$1" '$2 ~ re { n++ } END { print n + 0 }' <<<"$rows"
}
passed=$(count '^(OK|EXPECTEDFAIL)$')
failed=$(count '^(FAIL|TIMEOUT|ERROR|UNEXPECTEDPASS)$')
skipped=$(count '^SKIP$')

if [ "$failed" -gt 0 ]; then
    echo "failed tests:"
    awk -F'\t' '$2 ~ /^(FAIL|TIMEOUT|ERROR|UNEXPECTEDPASS)$/ {
        printf "  %-8s %s: %s\n", $2, $1, $3
        n = split($4, why, "\037")
        for (i = 1; i <= n; i++)
            if (why[i] != "")
                printf "      %s\n", why[i] }' <<<"$rows"
fi
if [ "$skipped" -gt 0 ]; then
    echo "skipped tests:"
    awk -F'\t' '$2 == "SKIP" {
        r = $4; sub(/^[ #]*/, "", r)
        printf "  %s: %s — %s\n", $1, $3, (r == "" ? "no reason given" : r) }' \
        <<<"$rows"
fi
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
