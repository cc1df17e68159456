#!/usr/bin/env bash
# Upstream with Bearer token auth (distribution + token_server.py): a private repo (users only)
# and a public one (anonymous pull).
#  * shoal with --auth-file pulls the private repo;
#  * shoal without credentials answers 401 with an UNAUTHORIZED JSON error;
#  * a client sending its own Authorization: Basic to that shoal gets through;
#  * what one client pulled with its credentials is not handed to clients without (or with
#    wrong) credentials;
#  * the public repo works anonymously through shoal;
#  * in a swarm of two nodes, private content one node holds reaches the other's client from
#    that peer only when the registry accepts the client's credentials (the registry sends the
#    layer once), and never reaches a client without (or with wrong) credentials.
source "$(dirname "$0")/lib.sh"
e2e_init test_auth

USER_NAME=alice
USER_PASS='s3cret-pa55'
start_registry AREG --token "$USER_NAME:$USER_PASS" --anonymous-pull 'public/*'

PUSH_CREDS=$USER_NAME:$USER_PASS push_image "$AREG" private/e2e-secret v1 --seed 501 --layers 2 --layer-size 1MiB
SECRET=$PUSH_JSON
PUSH_CREDS=$USER_NAME:$USER_PASS push_image "$AREG" private/e2e-secret-multi v1 --seed 502 --layers 1 \
    --layer-size 256KiB --platform linux/amd64 --platform linux/arm64
SECRET_MULTI=$PUSH_JSON
PUSH_CREDS=$USER_NAME:$USER_PASS push_image "$AREG" public/e2e-open v1 --seed 503 --layers 1 --layer-size 256KiB
OPEN=$PUSH_JSON

# --- the upstream set-up itself -------------------------------------------------------------
upstream_private() {
    local code
    code=$(http_code "http://$AREG/v2/private/e2e-secret/manifests/v1")
    [[ $code == 401 ]] || die "anonymous GET on the registry -> HTTP $code (want 401)"
    # anonymous token: issued, but with no access to private/*
    local tok
    tok=$(curl -sS --max-time 10 "$AREG_REALM?service=shoal-test-registry&scope=repository:private/e2e-secret:pull" | jq -r .token)
    code=$(http_code "http://$AREG/v2/private/e2e-secret/manifests/v1" -H "Authorization: Bearer $tok")
    [[ $code == 401 ]] || die "anonymous token on a private repo -> HTTP $code (want 401)"
    # wrong password: the token server refuses
    code=$(http_code "$AREG_REALM?service=shoal-test-registry&scope=repository:private/e2e-secret:pull" -u "$USER_NAME:nope")
    [[ $code == 401 ]] || die "token server with a wrong password -> HTTP $code (want 401)"
    # right password: the registry accepts the token
    tok=$(curl -sS --max-time 10 -u "$USER_NAME:$USER_PASS" "$AREG_REALM?service=shoal-test-registry&scope=repository:private/e2e-secret:pull" | jq -r .token)
    code=$(http_code "http://$AREG/v2/private/e2e-secret/manifests/v1" -H "Authorization: Bearer $tok" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json')
    [[ $code == 200 ]] || die "user token on the private repo -> HTTP $code (want 200)"
}
run_case "upstream: private repo needs a user token (anonymous 401, alice 200)" upstream_private

upstream_skopeo() {
    local got
    got=sha256:$(timeout 60 skopeo inspect --raw --tls-verify=false --creds "$USER_NAME:$USER_PASS" \
        "docker://$AREG/private/e2e-secret:v1" | sha256sum | cut -d' ' -f1)
    [[ $got == "$(jget "$SECRET" .manifest_digest)" ]] || die "skopeo --creds got $got"
    got=sha256:$(timeout 60 skopeo inspect --raw --tls-verify=false "docker://$AREG/public/e2e-open:v1" | sha256sum | cut -d' ' -f1)
    [[ $got == "$(jget "$OPEN" .manifest_digest)" ]] || die "skopeo anonymous on public/ got $got"
}
run_case "upstream: skopeo --creds reads the private repo, anonymous reads public/" upstream_skopeo

# --- shoal with credentials -----------------------------------------------------------------------
AUTH_B64=$(printf '%s:%s' "$USER_NAME" "$USER_PASS" | base64 -w0)
mkdir -p "$T/auth"
cat >"$T/auth/config.json" <<EOF
{"auths": {
  "$AREG": {"auth": "$AUTH_B64"},
  "docker.io": {"auth": "$AUTH_B64"}
}}
EOF
start_shoal SAUTH "$T/shoal-auth" "$AREG" --auth-file "$T/auth/config.json"
start_shoal SANON "$T/shoal-anon" "$AREG"

with_creds_pull() {
    need_shoal
    skopeo_verify_pull "$SAUTH" "$@"
}
run_case "shoal --auth-file: skopeo pulls private/e2e-secret:v1" \
    with_creds_pull private/e2e-secret v1 "$SECRET"
run_case "shoal --auth-file: skopeo --all pulls private/e2e-secret-multi:v1" \
    with_creds_pull private/e2e-secret-multi v1 "$SECRET_MULTI" --all

with_creds_ctr() {
    need_shoal
    start_containerd containerd
    ctr_verify "$SAUTH" private/e2e-secret:v1 "$SECRET"
}
run_case "shoal --auth-file: ctr pull docker.io/private/e2e-secret:v1 (?ns=docker.io)" with_creds_ctr

# --- shoal without credentials ---------------------------------------------------------------
# expect_401 URL [CURL ARGS]: HTTP 401 with an OCI error body whose first code is UNAUTHORIZED.
expect_401() {
    local url=$1 code body hdrs
    shift
    body=$(mktemp "$T/body.XXXXXX")
    hdrs=$(mktemp "$T/hdrs.XXXXXX")
    code=$(curl -sS -D "$hdrs" -o "$body" -w '%{http_code}' --max-time 30 "$@" "$url" || echo 000)
    if [[ $code != 401 ]]; then
        printf '  exchange: GET %s\n' "$url" >&2
        sed 's/^/  < /' "$hdrs" >&2
        head -c 600 "$body" | tr -c '[:print:]\n' '.' | sed 's/^/  < /' >&2
        echo >&2
        die "GET $url -> HTTP $code (want 401)"
    fi
    jq -e '.errors[0].code == "UNAUTHORIZED"' "$body" >/dev/null 2>&1 ||
        die "401 body is not an UNAUTHORIZED OCI error: $(head -c 300 "$body" | tr -c '[:print:]' '.')"
    if grep -qi '^www-authenticate:' "$hdrs"; then
        log "shoal 401 challenge: $(grep -i '^www-authenticate:' "$hdrs" | tr -d '\r')"
    else
        log "note: shoal's 401 for $url carries no WWW-Authenticate header (clients will not retry with credentials)"
    fi
}

no_creds_401() {
    need_shoal
    expect_401 "http://$SANON/v2/private/e2e-secret/manifests/v1" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json'
    expect_401 "http://$SANON/v2/private/e2e-secret/blobs/$(jq -r '.manifests[0].layers[0]' "$SECRET")"
}
run_case "shoal without credentials: private manifest and blob -> 401 UNAUTHORIZED JSON" no_creds_401

client_basic() {
    need_shoal
    local want got d
    want=$(jget "$SECRET" .manifest_digest)
    got=$(fetch_manifest_digest "http://$SANON" private/e2e-secret v1 -u "$USER_NAME:$USER_PASS")
    [[ $got == "$want" ]] || die "manifest with client Basic auth hashes to $got, want $want"
    for d in $(image_platform_blobs "$SECRET"); do
        fetch_verify_blob "http://$SANON" private/e2e-secret "$d" -u "$USER_NAME:$USER_PASS"
    done
}
run_case "shoal without credentials: client's own Authorization: Basic gets manifest and blobs" client_basic

no_leak() {
    need_shoal
    # after the authenticated pull above, the content is in shoal's store: it must still not be
    # served to a client without credentials or with wrong ones
    local leaks=() m l
    m='application/vnd.oci.image.manifest.v1+json'
    l=$(jq -r '.manifests[0].layers[0]' "$SECRET")
    (expect_401 "http://$SANON/v2/private/e2e-secret/manifests/v1" -H "Accept: $m") || leaks+=("anonymous manifest by tag")
    (expect_401 "http://$SANON/v2/private/e2e-secret/manifests/$(jget "$SECRET" .manifest_digest)" -H "Accept: $m") ||
        leaks+=("anonymous manifest by digest")
    (expect_401 "http://$SANON/v2/private/e2e-secret/blobs/$l") || leaks+=("anonymous blob")
    (expect_401 "http://$SANON/v2/private/e2e-secret/manifests/v1" -u "$USER_NAME:wrong" -H "Accept: $m") ||
        leaks+=("wrong-password manifest by tag")
    (expect_401 "http://$SANON/v2/private/e2e-secret/blobs/$l" -u "$USER_NAME:wrong") || leaks+=("wrong-password blob")
    ((${#leaks[@]} == 0)) || die "private content served from the cache to: $(IFS=,; echo "${leaks[*]}")"
}
run_case "shoal without credentials: cached private content is not served to anonymous / wrong-password clients" no_leak

public_anon() {
    need_shoal
    skopeo_verify_pull "$SANON" public/e2e-open v1 "$OPEN"
}
run_case "shoal without credentials: public/ repo pulls anonymously (token flow)" public_anon

# --- private content through the swarm -------------------------------------------------------------
swarm_private() {
    need_shoal
    local ports l size sent from_peers
    printf 'shoal-e2e-auth-%s\n' "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$T/cluster.key"
    chmod 600 "$T/cluster.key"
    start_counting_proxy UPP "$AREG"
    mapfile -t ports < <(free_ports 2)
    start_swarm_node P1 "$T/swarm-p1" "$UPP" "${ports[0]}" --cluster-key-file "$T/cluster.key"
    start_swarm_node P2 "$T/swarm-p2" "$UPP" "${ports[1]}" --cluster-key-file "$T/cluster.key" \
        --peer "$P1_P2P"
    sleep 3 # the DHT forms
    l=$(jq -r '.manifests[0].layers[1]' "$SECRET")
    size=$(jq -r --arg d "$l" '.blobs[] | select(.digest == $d) | .size' "$SECRET")
    fetch_verify_blob "http://$P1" private/e2e-secret "$l" -u "$USER_NAME:$USER_PASS"
    sleep 1 # P1's provider record spreads
    # P2 finds P1 holding it, but has no grant to show for these clients.
    expect_401 "http://$P2/v2/private/e2e-secret/blobs/$l"
    expect_401 "http://$P2/v2/private/e2e-secret/blobs/$l" -u "$USER_NAME:wrong"
    fetch_verify_blob "http://$P2" private/e2e-secret "$l" -u "$USER_NAME:$USER_PASS"
    # Blob bytes in successful answers (401 error bodies are not the layer).
    proxy_stat UPP .seq >/dev/null
    sent=$(awk -v p="/blobs/$l" '$3 == "GET" && index($4, p) && ($6 == 200 || $6 == 206) { n += $7 }
        END { print n + 0 }' "$UPP_LOG")
    from_peers=$(shoal_pull_record "$P2" "$l" | jq -r '[.fetched_from_peers // {} | .[]] | add // 0')
    log "private layer of $size B: the registry sent $sent B; P2 got $from_peers B from its peer"
    ((sent == size)) || die "the registry sent $sent B of the private layer ($size B): want exactly one copy"
    ((from_peers == size)) || die "P2 got $from_peers B of the private layer from its peer, want $size"
    # What P2 now holds is private on P2 too.
    expect_401 "http://$P2/v2/private/e2e-secret/blobs/$l"
}
run_case "swarm: private layer reaches a peer's client only with credentials the registry accepts" swarm_private

alive() {
    need_shoal
    pid_alive "$SAUTH_PID" || { show_log "$SAUTH_LOG"; die "shoal (auth) died"; }
    pid_alive "$SANON_PID" || { show_log "$SANON_LOG"; die "shoal (anon) died"; }
}
run_case "both shoal instances still up" alive

e2e_finish
