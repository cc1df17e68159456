#!/usr/bin/env bash
# Runs the Shoal end-to-end suite: every tests/e2e/test_*.sh (or the ones named as arguments),
# each under a time limit, and prints one summary line "e2e: N passed, N failed, N skipped".
# Exit status: 0 if nothing failed, 1 otherwise.
#
#   SHOAL_BIN=target/debug/shoal SHOAL_IMAGEGEN=target/debug/shoal-imagegen tests/e2e/run-all.sh
#   tests/e2e/run-all.sh test_offline test_auth      # a subset
#   E2E_DIRECT=1 tests/e2e/run-all.sh                  # validate set-ups without shoal
#
# Needs root (private containerd/dockerd) and the Debian packages: docker-registry skopeo
# containerd podman docker.io python3-jwt python3-cryptography jq curl.
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$E2E_DIR/../.." && pwd)
cd "$ROOT"

export SHOAL_BIN=${SHOAL_BIN:-$ROOT/target/debug/shoal}
export SHOAL_IMAGEGEN=${SHOAL_IMAGEGEN:-$ROOT/target/debug/shoal-imagegen}
case $SHOAL_BIN in /*) ;; *) SHOAL_BIN=$ROOT/$SHOAL_BIN ;; esac
case $SHOAL_IMAGEGEN in /*) ;; *) SHOAL_IMAGEGEN=$ROOT/$SHOAL_IMAGEGEN ;; esac
E2E_DIRECT=${E2E_DIRECT:-0}
PER_TEST_TIMEOUT=${E2E_TEST_TIMEOUT:-420}
PY=${E2E_PYTHON:-/usr/bin/python3}

# --- preflight ---------------------------------------------------------------------------------
problems=()
for c in docker-registry skopeo jq curl sha256sum cmp; do
    command -v "$c" >/dev/null 2>&1 || problems+=("missing command: $c")
done
"$PY" -c 'import jwt, cryptography' 2>/dev/null ||
    problems+=("$PY cannot import jwt/cryptography (apt-get install python3-jwt python3-cryptography)")
[[ -x $SHOAL_IMAGEGEN ]] || problems+=("no image generator at $SHOAL_IMAGEGEN (cargo build -p shoal-tools)")
if [[ $E2E_DIRECT != 1 ]]; then
    if [[ ! -x $SHOAL_BIN ]]; then
        problems+=("no shoal binary at $SHOAL_BIN (cargo build -p shoal-node)")
    elif ! "$SHOAL_BIN" run --help >/dev/null 2>&1; then
        problems+=("$SHOAL_BIN has no working 'run' subcommand ('$SHOAL_BIN run --help' fails)")
    fi
fi
if [[ $(id -u) != 0 ]]; then
    echo "note: not root: containerd, dockerd and podman cases will be skipped or fail" >&2
fi
if ((${#problems[@]})); then
    printf 'e2e preflight: %s\n' "${problems[@]}" >&2
    echo "e2e: 0 passed, 1 failed, 0 skipped"
    exit 1
fi

if (($#)); then
    tests=("$@")
else
    tests=()
    for f in "$E2E_DIR"/test_*.sh; do tests+=("$(basename "$f" .sh)"); done
fi

total_pass=0 total_fail=0 total_skip=0 bad_scripts=()
start=$SECONDS
for t in "${tests[@]}"; do
    t=${t%.sh}
    script=$E2E_DIR/$t.sh
    if [[ ! -f $script ]]; then
        echo "FAIL run-all: no such test $t"
        total_fail=$((total_fail + 1))
        bad_scripts+=("$t")
        continue
    fi
    echo "=== $t"
    out=$(mktemp)
    t0=$SECONDS
    set +e
    # TERM first (the script's trap cleans up), KILL 60 s later if it does not finish.
    timeout -k 60 "$PER_TEST_TIMEOUT" bash "$script" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    set -e
    # count the PASS/FAIL/SKIP lines themselves: they are there even if the script was cut short
    p=$(grep -acE "^PASS $t: " "$out" || true)
    f=$(grep -acE "^FAIL $t: " "$out" || true)
    s=$(grep -acE "^SKIP $t: " "$out" || true)
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
    total_skip=$((total_skip + s))
    summary=$(grep -aE "^$t: [0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$" "$out" | tail -n1 || true)
    if ((rc != 0)); then
        if [[ -z $summary || $f == 0 ]]; then
            # died without reporting (set-up error, timeout, ...): count that as one failure
            if ((rc == 124 || rc == 137)); then
                echo "FAIL $t: timed out after ${PER_TEST_TIMEOUT}s"
            else
                echo "FAIL $t: script exited with status $rc${summary:+ after its summary}"
            fi
            total_fail=$((total_fail + 1))
        fi
        bad_scripts+=("$t")
    fi
    echo "=== $t done in $((SECONDS - t0))s (exit $rc)"
    rm -f "$out"
done

echo "e2e run took $((SECONDS - start))s${bad_scripts[*]:+; failing: ${bad_scripts[*]}}"
echo "e2e: $total_pass passed, $total_fail failed, $total_skip skipped"
((total_fail == 0))
