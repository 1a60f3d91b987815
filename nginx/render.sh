#!/bin/sh
# Render the gateway config from the environment and (unless --render-only) exec nginx in the
# foreground. The same script is the gateway image's entrypoint and what tests / `make run` use.
#
#   NGINX_PREFIX      where the rendered config, generated files and temp dirs go
#   UPSTREAM          the worker, host:port
#   GATEWAY_LISTEN    port or addr:port to listen on (default 6006)
#   BASIC_AUTH_USERS  "user:password,user2:password2"   and/or BASIC_AUTH_FILE (htpasswd lines)
#   API_KEYS          "key1,key2"                       and/or API_KEYS_FILE (one key per line)
#   ALLOW_CIDRS       "10.0.0.0/8,192.168.1.0/24" (empty: everyone)
#   TLS_CERT, TLS_KEY paths of a mounted certificate and key: serve HTTPS on GATEWAY_LISTEN
# Credentials are never baked into an image: they come from the environment or mounted files.
set -eu

die() { echo "gateway: $*" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
: "${NGINX_PREFIX:=/etc/nginx/voxbox}"
: "${NGINX_TEMPLATES:=$here/templates}"
: "${NGINX_BIN:=nginx}"
: "${NGINX_WORKER_PROCESSES:=auto}"
: "${NGINX_ERROR_LOG_LEVEL:=warn}"
: "${NGINX_MIME_TYPES:=/etc/nginx/mime.types}"
: "${UPSTREAM:=tts:8000}"
: "${GATEWAY_LISTEN:=6006}"
: "${RATE_LIMIT_RPS:=10}"
: "${RATE_LIMIT_BURST:=20}"
: "${MAX_STREAMS_PER_CLIENT:=4}"
: "${MAX_JSON_BODY:=256k}"
: "${MAX_UPLOAD_BODY:=12m}"
: "${PROXY_READ_TIMEOUT:=600s}"
: "${ACCESS_LOG:=/dev/stdout}"
: "${BASIC_AUTH_USERS:=}" "${BASIC_AUTH_FILE:=}" "${API_KEYS:=}" "${API_KEYS_FILE:=}"
: "${ALLOW_CIDRS:=}" "${TLS_CERT:=}" "${TLS_KEY:=}"
export NGINX_PREFIX NGINX_WORKER_PROCESSES NGINX_ERROR_LOG_LEVEL NGINX_MIME_TYPES UPSTREAM RATE_LIMIT_RPS \
    RATE_LIMIT_BURST MAX_STREAMS_PER_CLIENT MAX_JSON_BODY MAX_UPLOAD_BODY PROXY_READ_TIMEOUT ACCESS_LOG

gen="$NGINX_PREFIX/generated"
mkdir -p "$NGINX_PREFIX/conf.d" "$gen" "$NGINX_PREFIX/tmp"
# nginx workers run unprivileged: what they read must be world-readable.
chmod 755 "$NGINX_PREFIX" "$gen" "$NGINX_PREFIX/conf.d"
umask 022

# --- basic auth ---------------------------------------------------------------------------
htpasswd="$gen/htpasswd"
: > "$htpasswd.tmp"
users=0
old_ifs=$IFS; IFS=','
for pair in $BASIC_AUTH_USERS; do
    IFS=$old_ifs
    [ -n "$pair" ] || continue
    user=${pair%%:*}; pass=${pair#*:}
    [ "$user" != "$pair" ] && [ -n "$user" ] && [ -n "$pass" ] || die "BASIC_AUTH_USERS entry '$user' must be user:password"
    printf '%s:%s\n' "$user" "$(openssl passwd -apr1 "$pass")" >> "$htpasswd.tmp"
    users=$((users + 1))
done
IFS=$old_ifs
if [ -n "$BASIC_AUTH_FILE" ]; then
    [ -r "$BASIC_AUTH_FILE" ] || die "BASIC_AUTH_FILE $BASIC_AUTH_FILE is not readable"
    grep -E '^[^#[:space:]][^:]*:.+' "$BASIC_AUTH_FILE" >> "$htpasswd.tmp" || true
    users=$((users + $(grep -cE '^[^#[:space:]][^:]*:.+' "$BASIC_AUTH_FILE" || true)))
fi
mv "$htpasswd.tmp" "$htpasswd"
chmod 644 "$htpasswd"

# --- bearer API keys ----------------------------------------------------------------------
keys_map="$gen/api_keys.map"; ids_map="$gen/api_key_ids.map"
: > "$keys_map.tmp"; : > "$ids_map.tmp"
keys=0
add_key() {
    key=$1
    printf '%s' "$key" | grep -Eq '^[A-Za-z0-9._~+/=-]{16,256}$' \
        || die "API key '$(printf %s "$key" | cut -c1-4)…' must be 16-256 characters of A-Z a-z 0-9 . _ ~ + / = -"
    # Logs name a key by a short hash, never by its value.
    id=$(printf '%s' "$key" | sha256sum | cut -c1-8)
    printf '"Bearer %s" 1;\n' "$key" >> "$keys_map.tmp"
    printf '"Bearer %s" "%s";\n' "$key" "$id" >> "$ids_map.tmp"
    keys=$((keys + 1))
}
old_ifs=$IFS; IFS=','
for key in $API_KEYS; do
    IFS=$old_ifs
    [ -n "$key" ] && add_key "$key"
done
IFS=$old_ifs
if [ -n "$API_KEYS_FILE" ]; then
    [ -r "$API_KEYS_FILE" ] || die "API_KEYS_FILE $API_KEYS_FILE is not readable"
    while IFS= read -r key || [ -n "$key" ]; do
        key=$(printf '%s' "$key" | tr -d '[:space:]')
        case "$key" in ""|\#*) continue ;; esac
        add_key "$key"
    done < "$API_KEYS_FILE"
fi
mv "$keys_map.tmp" "$keys_map"; mv "$ids_map.tmp" "$ids_map"
chmod 644 "$keys_map" "$ids_map"
[ $((users + keys)) -gt 0 ] || die "no credentials: set BASIC_AUTH_USERS (user:password) and/or API_KEYS; the gateway never runs open"

# --- IP allowlist -------------------------------------------------------------------------
geo="$gen/allowlist.geo"
if [ -z "$ALLOW_CIDRS" ]; then
    echo "default 1;" > "$geo"
else
    echo "default 0;" > "$geo"
    for cidr in $(echo "$ALLOW_CIDRS" | tr ',' ' '); do
        printf '%s' "$cidr" | grep -Eq '^[0-9a-fA-F:.]+(/[0-9]{1,3})?$' || die "ALLOW_CIDRS entry '$cidr' is not an address or CIDR"
        echo "$cidr 1;" >> "$geo"
    done
fi

# --- listen (optionally TLS) and security headers -------------------------------------------
headers="$gen/security_headers.conf"
cat > "$headers" <<'HDR'
add_header X-Content-Type-Options nosniff always;
add_header X-Frame-Options DENY always;
add_header Referrer-Policy no-referrer always;
add_header Content-Security-Policy "default-src 'self'; media-src 'self' blob:; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self' 'unsafe-inline'" always;
add_header X-Request-ID $voxbox_request_id always;
HDR
if [ -n "$TLS_CERT" ] || [ -n "$TLS_KEY" ]; then
    [ -r "$TLS_CERT" ] && [ -r "$TLS_KEY" ] || die "TLS_CERT and TLS_KEY must both name readable files"
    cat > "$gen/listen.conf" <<LST
listen $GATEWAY_LISTEN ssl;
ssl_certificate $TLS_CERT;
ssl_certificate_key $TLS_KEY;
ssl_protocols TLSv1.2 TLSv1.3;
LST
    echo 'add_header Strict-Transport-Security "max-age=31536000" always;' >> "$headers"
else
    echo "listen $GATEWAY_LISTEN;" > "$gen/listen.conf"
fi

# --- templates ------------------------------------------------------------------------------
vars='${NGINX_PREFIX} ${NGINX_WORKER_PROCESSES} ${NGINX_ERROR_LOG_LEVEL} ${NGINX_MIME_TYPES} ${UPSTREAM} ${RATE_LIMIT_RPS} ${RATE_LIMIT_BURST} ${MAX_STREAMS_PER_CLIENT} ${MAX_JSON_BODY} ${MAX_UPLOAD_BODY} ${PROXY_READ_TIMEOUT} ${ACCESS_LOG}'
envsubst "$vars" < "$NGINX_TEMPLATES/nginx.conf.template" > "$NGINX_PREFIX/nginx.conf"
envsubst "$vars" < "$NGINX_TEMPLATES/voxbox.conf.template" > "$NGINX_PREFIX/conf.d/voxbox.conf"
chmod 644 "$NGINX_PREFIX/nginx.conf" "$NGINX_PREFIX/conf.d/voxbox.conf"
echo "gateway: rendered $NGINX_PREFIX (upstream $UPSTREAM, listen $GATEWAY_LISTEN, $users user(s), $keys API key(s))" >&2

case "${1:-}" in
    --render-only) exit 0 ;;
    --test) exec "$NGINX_BIN" -t -p "$NGINX_PREFIX" -c "$NGINX_PREFIX/nginx.conf" ;;
esac
exec "$NGINX_BIN" -p "$NGINX_PREFIX" -c "$NGINX_PREFIX/nginx.conf" -g 'daemon off;'
