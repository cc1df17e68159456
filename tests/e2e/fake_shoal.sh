#!/usr/bin/env bash
# Stand-in for `shoal run` built on the CNCF distribution registry's pull-through cache mode, to
# exercise the e2e scripts' own mechanics (kill -9 / restart, offline, auth files, ...) without
# the real daemon:
#
#   SHOAL_BIN=tests/e2e/fake_shoal.sh tests/e2e/run-all.sh
#
# Understands `run --listen A --data-dir D --upstream URL [--auth-file F]`; --registry, --tag-ttl,
# --cache-size and --config are accepted and ignored. It is NOT shoal: its results only say
# whether a test script works, e.g. distribution has no /metrics on its main port, answers 401
# without an OCI body in some cases, and does not accept client credentials in proxy mode.
set -euo pipefail

if [[ ${1:-} != run ]]; then
    echo "usage: fake_shoal.sh run --listen ADDR --data-dir DIR --upstream URL [--auth-file FILE]" >&2
    exit 2
fi
shift
listen='' data='' upstream='' authfile=''
while (($#)); do
    case $1 in
        --help | -h)
            echo "fake_shoal.sh run --listen ADDR --data-dir DIR --upstream URL [--auth-file FILE]"
            exit 0
            ;;
        --listen) listen=$2; shift 2 ;;
        --data-dir) data=$2; shift 2 ;;
        --upstream) upstream=$2; shift 2 ;;
        --auth-file) authfile=$2; shift 2 ;;
        --registry | --tag-ttl | --cache-size | --config) shift 2 ;;
        *) echo "fake_shoal.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n $listen && -n $data && -n $upstream ]] || { echo "fake_shoal.sh: --listen, --data-dir, --upstream required" >&2; exit 2; }
mkdir -p "$data/storage"
cfg=$data/fake-shoal-config.yml
cat >"$cfg" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $data/storage
  delete:
    enabled: true
http:
  addr: $listen
  secret: fake-shoal
proxy:
  remoteurl: $upstream
EOF
if [[ -n $authfile ]]; then
    host=${upstream#*://}
    host=${host%%/*}
    creds=$(jq -r --arg h "$host" '.auths[$h].auth // empty' "$authfile" | base64 -d)
    if [[ -n $creds ]]; then
        printf '  username: %s\n  password: %s\n' "${creds%%:*}" "${creds#*:}" >>"$cfg"
    fi
fi
exec docker-registry serve "$cfg"
