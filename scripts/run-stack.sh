#!/usr/bin/env bash
# Native run of the whole stack, the same pieces as compose.yaml without Docker: the worker under
# gunicorn on a loopback port and the nginx gateway (same templates, same render.sh) in front.
# Credentials are generated on first run into .run/credentials (git-ignored); never a fixed default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GATEWAY_PORT=${GATEWAY_PORT:-6006}
WORKER_PORT=${WORKER_PORT:-8001}
HOST=${HOST:-127.0.0.1}
RUN_DIR=$PWD/.run
mkdir -p "$RUN_DIR"
chmod 700 "$RUN_DIR"

creds="$RUN_DIR/credentials"
if [ ! -f "$creds" ]; then
    umask 077
    cat > "$creds" <<EOC
export VOXBOX_USER=voxbox
export VOXBOX_PASSWORD=$(openssl rand -base64 18 | tr -d '/+=' | cut -c1-20)
export VOXBOX_API_KEY=vbx_$(openssl rand -hex 24)
EOC
    umask 022
fi
# shellcheck disable=SC1090
. "$creds"

# nginx's workers run as nobody when started by root: keep its files where nobody can read them.
NGINX_PREFIX=${NGINX_PREFIX:-/tmp/voxbox-gateway-$(id -u)-$(printf %s "$PWD" | sha256sum | cut -c1-8)}

pids=()
cleanup() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

TTS_ENGINE=${TTS_ENGINE:-embedded} VOICES_DIR=${VOICES_DIR:-$RUN_DIR/voices} BIND=127.0.0.1:$WORKER_PORT \
    "$(dirname "$PY")/gunicorn" -c service/gunicorn.conf.py 'service.app:create_app()' &
pids+=($!)

# No health listener natively: it is for the container's health check, and a second checkout's
# `make run` (on another GATEWAY_PORT) would find its port 6007 taken.
NGINX_PREFIX=$NGINX_PREFIX UPSTREAM=127.0.0.1:$WORKER_PORT GATEWAY_LISTEN=$HOST:$GATEWAY_PORT \
    GATEWAY_HEALTH_LISTEN=${GATEWAY_HEALTH_LISTEN:-off} \
    BASIC_AUTH_USERS="$VOXBOX_USER:$VOXBOX_PASSWORD" API_KEYS="$VOXBOX_API_KEY" \
    NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)} NGINX_WORKER_PROCESSES=${NGINX_WORKER_PROCESSES:-2} \
    sh nginx/render.sh &
pids+=($!)

url="http://$HOST:$GATEWAY_PORT"
READY_TIMEOUT_S=${READY_TIMEOUT_S:-300}
ready=0
for _ in $(seq 1 "$READY_TIMEOUT_S"); do
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "run-stack: a process exited during start-up (see above)" >&2; exit 1; }
    done
    if curl -fsS -u "$VOXBOX_USER:$VOXBOX_PASSWORD" "$url/readyz" >/dev/null 2>&1; then ready=1; break; fi
    sleep 1
done
if [ "$ready" != 1 ]; then
    echo "run-stack: not ready after ${READY_TIMEOUT_S}s ($url/readyz; see the log above); stopping" >&2
    exit 1
fi
cat <<MSG

  VoxBox is up:  $url/
  Log in as      $VOXBOX_USER / $VOXBOX_PASSWORD
  API key        $VOXBOX_API_KEY   (Authorization: Bearer ...; stored in .run/credentials)
  Try:           curl -s -u '$VOXBOX_USER:$VOXBOX_PASSWORD' $url/tts -H 'content-type: application/json' -d '{"text":"hello world"}'
  Ctrl-C stops both the gateway and the worker.

MSG
wait -n "${pids[@]}"
