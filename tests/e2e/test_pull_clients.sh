#!/usr/bin/env bash
# Pull single-arch and multi-arch images (OCI and Docker media types) through shoal with every
# client we can run: skopeo, containerd's ctr (hosts.toml mirror, ?ns=docker.io), podman
# (registries.conf mirror) and dockerd (--registry-mirror, library/ prefix, no ns). Every client
# must end up with exactly the pushed manifest digest; skopeo's dir: copies are hashed blob by blob.
source "$(dirname "$0")/lib.sh"
e2e_init test_pull_clients

start_registry REG

# Docker's mirror protocol only covers Docker Hub, where one-word names live under library/:
# push everything there so every client can pull the same repositories.
push_image "$REG" library/e2e-single v1 --seed 101 --layers 3 --layer-size 2MiB
SINGLE=$PUSH_JSON
push_image "$REG" library/e2e-multi v1 --seed 102 --layers 2 --layer-size 512KiB \
    --platform linux/amd64 --platform linux/arm64
MULTI=$PUSH_JSON
push_image "$REG" library/e2e-dsingle v1 --seed 103 --layers 2 --layer-size 1MiB --format docker
DSINGLE=$PUSH_JSON
push_image "$REG" library/e2e-dlist v1 --seed 104 --layers 2 --layer-size 512KiB --format docker \
    --platform linux/amd64 --platform linux/arm64/v8
DLIST=$PUSH_JSON

start_shoal SHOAL "$T/shoal-data" "$REG"

IMAGES=("e2e-single:$SINGLE" "e2e-multi:$MULTI" "e2e-dsingle:$DSINGLE" "e2e-dlist:$DLIST")

# --- skopeo -----------------------------------------------------------------------------------
if have skopeo; then
    for entry in "${IMAGES[@]}"; do
        name=${entry%%:*} json=${entry#*:}
        run_case "skopeo copy $name:v1 (linux/amd64) via shoal" \
            skopeo_verify_pull "$SHOAL" "library/$name" v1 "$json"
        if image_is_index "$json"; then
            run_case "skopeo copy --all $name:v1 (every platform) via shoal" \
                skopeo_verify_pull "$SHOAL" "library/$name" v1 "$json" --all
        fi
    done
    run_case "skopeo copy e2e-single by digest via shoal" \
        skopeo_verify_pull "$SHOAL" library/e2e-single v1 "$SINGLE" --by-digest
    run_case "skopeo copy --all e2e-multi by digest via shoal" \
        skopeo_verify_pull "$SHOAL" library/e2e-multi v1 "$MULTI" --all --by-digest
else
    skip "skopeo pulls" "skopeo not installed"
fi

# --- containerd / ctr ---------------------------------------------------------------------------
run_case "containerd: private daemon starts" start_containerd
if load_env containerd; then
    for entry in "${IMAGES[@]}"; do
        name=${entry%%:*} json=${entry#*:}
        extra=()
        if image_is_index "$json"; then extra=(--all-platforms); fi
        run_case "ctr pull docker.io/library/$name:v1${extra[*]:+ ${extra[*]}} via shoal" \
            ctr_verify "$SHOAL" "library/$name:v1" "$json" ${extra[@]+"${extra[@]}"}
    done
fi

# --- podman -------------------------------------------------------------------------------------
run_case "podman: private storage (vfs) and registries.conf mirror" podman_setup "$SHOAL"
if load_env podman; then
    for entry in "${IMAGES[@]}"; do
        name=${entry%%:*} json=${entry#*:}
        run_case "podman pull docker.io/library/$name:v1 via shoal mirror" \
            podman_verify "library/$name:v1" "$json"
    done
fi

# --- dockerd ------------------------------------------------------------------------------------
run_case "dockerd: private daemon with --registry-mirror starts" start_dockerd "$SHOAL"
if load_env dockerd; then
    for entry in "${IMAGES[@]}"; do
        name=${entry%%:*} json=${entry#*:}
        run_case "docker pull $name:v1 via shoal mirror" docker_verify "$name:v1" "$json"
    done
fi

# --- shoal's own view ---------------------------------------------------------------------------
check_metrics() {
    need_shoal
    local code
    code=$(http_code "http://$SHOAL/metrics")
    [[ $code == 200 ]] || die "GET /metrics -> HTTP $code"
    if ! pid_alive "$SHOAL_PID"; then show_log "$SHOAL_LOG"; die "shoal died"; fi
}
run_case "shoal still up, /metrics answers 200" check_metrics

ns_routed() {
    need_shoal
    local n
    load_env containerd || skip_case "containerd did not run"
    n=$(metric_value "$SHOAL" shoal_upstream_requests_total 'registry="docker.io"')
    ((n > 0)) || die "no upstream request counted for registry=\"docker.io\" although ctr sent ?ns=docker.io"
}
run_case "ctr's ?ns=docker.io requests went to the docker.io registry mapping" ns_routed

e2e_finish
