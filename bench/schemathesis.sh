#!/usr/bin/env bash
# schemathesis against the running service's /openapi.json: no operation may answer 5xx.
#
# Builds tokenwarden, starts the sandbox provider and the service on free loopback ports over a
# fresh SQLite file, creates an organization and one instance (through the sandbox, as
# tests/it/harness.rs does), then runs schemathesis with the platform's full Authorization header
# (User, Organization, Element). Cleans up whatever it started. Exits non-zero when schemathesis
# reports a failure (a 5xx, or any check below), or when something it needs did not start.
#
# Not part of .ci/run: it takes minutes. Needs python3 (pip installs schemathesis into a venv under
# target/ when `st` is not on PATH) and curl.
#
#   bench/schemathesis.sh                      # 50 examples per operation
#   MAX_EXAMPLES=200 bench/schemathesis.sh     # more
#   CHECKS=all bench/schemathesis.sh           # every check, not only "no server error"
#   BUILD=release bench/schemathesis.sh        # against the release build
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
MAX_EXAMPLES=${MAX_EXAMPLES:-50}
CHECKS=${CHECKS:-not_a_server_error}
SEED=${SEED:-1}
BUILD=${BUILD:-debug}
# Phases: the OpenAPI examples, the coverage phase (boundary and negative values) and random
# fuzzing. Stateful testing is left out: it chains DELETEs into the next calls' ids.
PHASES=${PHASES:-examples,coverage,fuzzing}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tokenwarden-schemathesis.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "schemathesis.sh: $*" >&2; }

# schemathesis: the one on PATH, else a venv of our own.
if command -v st >/dev/null 2>&1; then
    ST=st
else
    VENV=$ROOT/target/schemathesis-venv
    if [ ! -x "$VENV/bin/st" ]; then
        log "installing schemathesis into $VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet 'schemathesis>=4,<5'
    fi
    ST=$VENV/bin/st
fi

if [ "$BUILD" = release ]; then
    cargo build --release --quiet --bin tokenwarden
    BIN=$ROOT/target/release/tokenwarden
else
    cargo build --quiet --bin tokenwarden
    BIN=$ROOT/target/debug/tokenwarden
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_for() { # url
    for _ in $(seq 1 100); do
        if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    log "nothing answers at $1"
    return 1
}

SANDBOX_PORT=$(free_port)
PORT=$(free_port)
DB="sqlite://$WORK/tokenwarden.db"
SANDBOX=http://127.0.0.1:$SANDBOX_PORT
BASE=http://127.0.0.1:$PORT
API=$BASE/elements/api-v2
CALLBACK=$BASE/oauth/callback
export RUST_LOG=${RUST_LOG:-warn}

"$BIN" sandbox --bind "127.0.0.1:$SANDBOX_PORT" >"$WORK/sandbox.log" 2>&1 &
PIDS+=($!)
TOKENWARDEN_SANDBOX_URL=$SANDBOX "$BIN" serve --bind "127.0.0.1:$PORT" --database-url "$DB" \
    >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
wait_for "$SANDBOX/__sandbox/profiles"
wait_for "$BASE/healthz"

json() { # expression, reading JSON on stdin
    python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"
}

ORG=$("$BIN" orgs create --name schemathesis --database-url "$DB")
USER_SECRET=$(echo "$ORG" | json 'd["userSecret"]')
ORG_SECRET=$(echo "$ORG" | json 'd["organizationSecret"]')
PLATFORM="User $USER_SECRET, Organization $ORG_SECRET"

# An instance, through the sandbox: authorization URL → approval (login_hint, no browser) →
# code and state from the redirect → POST /instances. Prints "<id> <Element token>".
create_instance() {
    local oauth_url location code state created
    oauth_url=$(curl -fsS -G "$API/elements/sandbox-box/oauth/url" -H "Authorization: $PLATFORM" \
        --data-urlencode apiKey=a --data-urlencode apiSecret=b --data-urlencode "callbackUrl=$CALLBACK" |
        json 'd["oauthUrl"]')
    location=$(curl -sS -o /dev/null -w '%{redirect_url}' "$oauth_url&login_hint=alice")
    read -r code state < <(python3 -c '
import sys, urllib.parse
q = urllib.parse.parse_qs(urllib.parse.urlsplit(sys.argv[1]).query)
print(q["code"][0], q["state"][0])' "$location")
    created=$(curl -fsS -X POST "$API/instances" -H "Authorization: $PLATFORM" \
        -H 'Content-Type: application/json' \
        -d "{\"element\":{\"key\":\"sandbox-box\"},\"providerData\":{\"code\":\"$code\",\"state\":\"$state\"},
             \"configuration\":{\"oauth.api.key\":\"a\",\"oauth.api.secret\":\"b\",\"oauth.callback.url\":\"$CALLBACK\"},
             \"name\":\"schemathesis\"}")
    echo "$created" | json 'd["id"], d["token"]'
}

new_instance() { # sets INSTANCE_ID and ELEMENT, or stops the script
    read -r INSTANCE_ID ELEMENT < <(create_instance) || true
    if [ -z "${ELEMENT:-}" ]; then
        log "could not create an instance through the sandbox"
        exit 1
    fi
}

log "service at $BASE, sandbox at $SANDBOX"


run_schemathesis() { # label, then the arguments of `st` up to and including `run URL`
    local label=$1
    shift
    log "pass $label"
    "$ST" "$@" \
        --header "Authorization: $PLATFORM, Element $ELEMENT" \
        --checks "$CHECKS" \
        --max-examples "$MAX_EXAMPLES" \
        --phases "$PHASES" \
        --seed "$SEED" \
        --workers 2 \
        --request-timeout 30 \
        --max-redirects 0 \
        --suppress-health-check all \
        --report junit --report-junit-path "$ROOT/target/schemathesis-$label.xml" \
        "${EXTRA[@]}"
}
EXTRA=("$@")

set +e
STATUS=0
record() { [ "$STATUS" -ne 0 ] || STATUS=$1; }

# Pass 1, the proxy with a live instance: generated paths, queries, bodies and methods go through
# confinement, the credential check and the call to the sandbox's API.
new_instance
run_schemathesis proxy run "$BASE/openapi.json" --include-path-regex '/proxy/'
record $?

# Pass 2, the operations that take an id, a key or a proxy path, pointed at a fresh instance,
# the sandbox connector and an API path the sandbox serves, so that generated bodies and queries
# reach the handlers' logic. DELETEs are left out: a deleted instance would turn the rest of the
# pass into 404s.
new_instance
printf '[parameters]\n"path.id" = %s\n"path.key" = "sandbox-box"\n"path.path" = "2.0/users/me"\n' \
    "$INSTANCE_ID" >"$WORK/schemathesis.toml"
run_schemathesis existing --config-file "$WORK/schemathesis.toml" run "$BASE/openapi.json" \
    --exclude-method DELETE
record $?

# Pass 3, every operation (DELETEs too) with generated values: ids, keys and paths that mostly
# do not exist, bodies and queries of every shape.
new_instance
run_schemathesis generated run "$BASE/openapi.json"
record $?
set -e

# An internal error or a panic (a panicking handler drops the connection: no 5xx to see) is in
# the service's log.
if grep -E 'internal error|panicked' "$WORK/serve.log" >/dev/null; then
    log "the service log shows an internal error or a panic:"
    grep -E 'internal error|panicked' "$WORK/serve.log" | head -20 >&2
    cp "$WORK/serve.log" "$ROOT/target/schemathesis-serve.log"
    [ "$STATUS" -ne 0 ] || STATUS=1
fi
log "schemathesis exited $STATUS (junit: target/schemathesis-{proxy,existing,generated}.xml)"
exit "$STATUS"
