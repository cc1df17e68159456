#!/usr/bin/env bash
# Configuration surfaces of `shoal run`: a TOML --config file, SHOAL_* environment variables,
# their precedence (flag > env > file), rejection of bad settings at start-up, and --cache-size
# actually capping the store.
source "$(dirname "$0")/lib.sh"
e2e_init test_config

start_registry REG
push_image "$REG" library/e2e-config v1 --seed 601 --layers 2 --layer-size 512KiB
IMG=$PUSH_JSON

# pull_ok ADDR: skopeo pull (no ns) and a raw ?ns=docker.io manifest GET through ADDR
pull_ok() {
    local addr=$1 got want
    skopeo_verify_pull "$addr" library/e2e-config v1 "$IMG"
    want=$(jget "$IMG" .manifest_digest)
    got=$(fetch_manifest_digest "http://$addr" library/e2e-config "v1?ns=docker.io")
    [[ $got == "$want" ]] || die "GET manifests/v1?ns=docker.io -> $got, want $want"
}

from_file() {
    need_shoal
    local port f
    port=$(free_port)
    f=$T/shoal.toml
    cat >"$f" <<EOF
listen = "127.0.0.1:$port"
data_dir = "$T/data-file"
upstream = "http://$REG"
cache_size = "1GiB"
tag_ttl = 5
upstream_timeout = 20

[registries]
"docker.io" = "http://$REG"
EOF
    start_shoal_raw SFILE "$port" -- --config "$f"
    pull_ok "$SFILE"
    stop_shoal SFILE
}
run_case "--config TOML file alone configures shoal" from_file

from_env() {
    need_shoal
    local port
    port=$(free_port)
    start_shoal_raw SENV "$port" SHOAL_LISTEN="127.0.0.1:$port" SHOAL_DATA_DIR="$T/data-env" \
        SHOAL_UPSTREAM="http://$REG" SHOAL_REGISTRY="docker.io=http://$REG" SHOAL_TAG_TTL=5 \
        SHOAL_CACHE_SIZE=1GiB --
    pull_ok "$SENV"
    stop_shoal SENV
}
run_case "SHOAL_* environment variables alone configure shoal" from_env

precedence() {
    need_shoal
    local pf pe pc f
    pf=$(free_port)
    pe=$(free_port)
    pc=$(free_port)
    f=$T/prec.toml
    printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s"\nupstream = "http://%s"\n' "$pf" "$T/data-prec" "$REG" >"$f"
    # flag beats env beats file
    start_shoal_raw SP1 "$pc" SHOAL_LISTEN="127.0.0.1:$pe" -- --config "$f" --listen "127.0.0.1:$pc"
    [[ $(http_code "http://127.0.0.1:$pe/v2/") == 000 && $(http_code "http://127.0.0.1:$pf/v2/") == 000 ]] ||
        die "with --listen given, shoal also answers on the env or file address"
    stop_shoal SP1
    start_shoal_raw SP2 "$pe" SHOAL_LISTEN="127.0.0.1:$pe" -- --config "$f"
    [[ $(http_code "http://127.0.0.1:$pf/v2/") == 000 ]] || die "with SHOAL_LISTEN set, shoal answers on the file address"
    stop_shoal SP2
}
run_case "precedence: --listen over SHOAL_LISTEN over the config file" precedence

# rejects DESCRIPTION ARGS...: `shoal run ARGS` must exit non-zero within 15 s, saying why in one line.
rejects() {
    local what=$1 out rc
    shift
    out=$T/reject.$RANDOM.log
    set +e
    timeout 15 "$SHOAL_BIN" run "$@" >"$out" 2>&1
    rc=$?
    set -e
    if ((rc == 124)); then die "$what: shoal kept running (args: $*)"; fi
    ((rc != 0)) || die "$what: shoal exited 0 (args: $*)"
    [[ -s $out ]] || die "$what: shoal exited $rc without saying why"
    vlog "$what -> exit $rc: $(head -n1 "$out")"
}

bad_settings() {
    need_shoal
    local port f
    port=$(free_port)
    f=$T/bad.toml
    printf 'listne = "127.0.0.1:%s"\n' "$port" >"$f"
    rejects "unknown key in the config file" --config "$f" --data-dir "$T/data-bad"
    rejects "bad --cache-size" --listen "127.0.0.1:$port" --data-dir "$T/data-bad" --cache-size 10XB
    rejects "bad --upstream scheme" --listen "127.0.0.1:$port" --data-dir "$T/data-bad" --upstream ftp://example.invalid
    rejects "bad --registry entry" --listen "127.0.0.1:$port" --data-dir "$T/data-bad" --registry docker.io
    rejects "bad --listen" --listen "not-an-address" --data-dir "$T/data-bad"
    rejects "missing config file" --config "$T/does-not-exist.toml" --data-dir "$T/data-bad"
}
run_case "bad settings are rejected at start-up (exit != 0, with a message)" bad_settings

cache_cap() {
    need_shoal
    local cap=$((3 << 20)) i bytes ev
    for i in 1 2 3 4; do
        push_image "$REG" "library/e2e-cap$i" v1 --seed $((610 + i)) --layers 1 --layer-size 1MiB
        cp "$PUSH_JSON" "$T/cap$i.json"
    done
    start_shoal SCAP "$T/data-cap" "$REG" --cache-size "$cap"
    for i in 1 2 3 4; do
        skopeo_verify_pull "$SCAP" "library/e2e-cap$i" v1 "$T/cap$i.json"
    done
    bytes=$(metric_value "$SCAP" shoal_cache_bytes)
    ev=$(metric_value "$SCAP" shoal_cache_evictions_total)
    log "cache cap $cap: shoal_cache_bytes=$bytes shoal_cache_evictions_total=$ev, data dir $(du -sb "$T/data-cap" | cut -f1) bytes"
    ((bytes <= cap)) || die "shoal_cache_bytes $bytes exceeds --cache-size $cap"
    ((ev > 0)) || die "4 MiB of blobs through a 3 MiB cache but no eviction counted"
    # an evicted image is fetched again, correctly
    skopeo_verify_pull "$SCAP" library/e2e-cap1 v1 "$T/cap1.json"
}
run_case "--cache-size 3MiB: the store stays under the cap, evicted blobs are re-fetched" cache_cap

e2e_finish
