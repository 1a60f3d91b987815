#!/bin/sh
# Render the gateway config from the environment and (unless --render-only) exec nginx in the
# foreground. The same script is the gateway image's entrypoint and what tests / `make run` use.
# --test renders and runs `nginx -t`; --reload renders again (mounted key/password files may have
# changed) and has the running nginx reload, re-resolving the worker's name at once.
#
#   NGINX_PREFIX      where the rendered config, generated files and temp dirs go
#   UPSTREAM          the worker(s): host:port (or unix:/path), or a comma-separated list of addresses
#                     ("10.0.0.5:8000,10.0.0.6:8000"), spread by least connections. A name is re-resolved
#                     every few seconds through RESOLVER, so a worker that restarts on a new IP is found
#                     again, and requests are spread over all the addresses it resolves to (Compose
#                     --scale, a Kubernetes headless Service)
#   RESOLVER          DNS server(s) for that, "addr[:port] ..." (default: /etc/resolv.conf's nameservers,
#                     127.0.0.11 under Docker); "off" resolves the name once at start (e.g. localhost)
#   GATEWAY_HEALTH_LISTEN  address:port of a loopback listener that answers 200 while nginx runs, for
#                     the container's health check (default 127.0.0.1:6007; "off": none)
#   UPSTREAM_TRIES    workers tried per synthesis request when one refuses or answers 503 (default 3)
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
: "${UPSTREAM_TRIES:=3}"
: "${ACCESS_LOG:=/dev/stdout}"
: "${BASIC_AUTH_USERS:=}" "${BASIC_AUTH_FILE:=}" "${API_KEYS:=}" "${API_KEYS_FILE:=}"
: "${ALLOW_CIDRS:=}" "${TLS_CERT:=}" "${TLS_KEY:=}" "${RESOLVER:=}" "${RESOLV_CONF:=/etc/resolv.conf}"
: "${GATEWAY_HEALTH_LISTEN:=127.0.0.1:6007}"
# Settings substituted into the config are checked first: a bad one is named here, not in an nginx
# error about a generated file (and a ';' cannot inject directives).
check() {  # VARIABLE VALUE EXTENDED-REGEX WHAT
    printf '%s' "$2" | grep -Eqx "$3" && [ "$(printf '%s' "$2" | wc -l)" -eq 0 ] \
        || die "$1='$2' must be $4"
}
check RATE_LIMIT_RPS "$RATE_LIMIT_RPS" '[1-9][0-9]{0,5}' "a whole number of requests per second, 1 or more"
check RATE_LIMIT_BURST "$RATE_LIMIT_BURST" '[0-9]{1,6}' "a whole number of requests (0 or more)"
check MAX_STREAMS_PER_CLIENT "$MAX_STREAMS_PER_CLIENT" '[1-9][0-9]{0,5}' "a whole number, 1 or more"
check MAX_JSON_BODY "$MAX_JSON_BODY" '[1-9][0-9]*[kKmMgG]?' "a size above 0 like 256k or 12m"
check MAX_UPLOAD_BODY "$MAX_UPLOAD_BODY" '[1-9][0-9]*[kKmMgG]?' "a size above 0 like 256k or 12m"
check UPSTREAM_TRIES "$UPSTREAM_TRIES" '[1-9][0-9]{0,2}' "a whole number of workers to try per synthesis request, 1 or more"
check PROXY_READ_TIMEOUT "$PROXY_READ_TIMEOUT" '[1-9][0-9]*(ms|s|m|h|d)?' "a duration like 600s or 10m"
one_upstream='[A-Za-z0-9._-]+:[0-9]{1,5}|\[[0-9a-fA-F:]+\]:[0-9]{1,5}|unix:/[^ ,;{}]+'
check UPSTREAM "$UPSTREAM" "($one_upstream)(,($one_upstream))*" "host:port, or a comma-separated list of them"
check GATEWAY_LISTEN "$GATEWAY_LISTEN" '[0-9]{1,5}|[A-Za-z0-9.-]+:[0-9]{1,5}|\[[0-9a-fA-F:]+\]:[0-9]{1,5}' \
    "a port or address:port"
# address:port only: a bare port would open the health listener on every interface.
check GATEWAY_HEALTH_LISTEN "$GATEWAY_HEALTH_LISTEN" 'off|[A-Za-z0-9.-]+:[0-9]{1,5}|\[[0-9a-fA-F:]+\]:[0-9]{1,5}' \
    "a loopback address:port like 127.0.0.1:6007, or off"

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
    case "$user" in *[!A-Za-z0-9._@-]*) die "BASIC_AUTH_USERS user '$user' may hold only letters, digits and . _ @ - (no spaces)" ;; esac
    [ "${#pass}" -le 255 ] || die "BASIC_AUTH_USERS password of '$user' is longer than 255 characters (openssl would cut it)"
    # From stdin, so a password that starts with '-' is not read as an option.
    hash=$(printf '%s\n' "$pass" | openssl passwd -apr1 -stdin) && case "$hash" in '$apr1$'*) ;; *) false ;; esac \
        || die "BASIC_AUTH_USERS: could not hash the password of '$user' with openssl"
    ! cut -d: -f1 "$htpasswd.tmp" | grep -qxF "$user" || die "BASIC_AUTH_USERS lists '$user' twice; keep one password per user"
    printf '%s:%s\n' "$user" "$hash" >> "$htpasswd.tmp"
    users=$((users + 1))
done
IFS=$old_ifs
if [ -n "$BASIC_AUTH_FILE" ]; then
    [ -f "$BASIC_AUTH_FILE" ] && [ -r "$BASIC_AUTH_FILE" ] || die "BASIC_AUTH_FILE $BASIC_AUTH_FILE is not a readable file"
    grep -E '^[^#[:space:]][^:]*:.+' "$BASIC_AUTH_FILE" >> "$htpasswd.tmp" || true
    users=$((users + $(grep -cE '^[^#[:space:]][^:]*:.+' "$BASIC_AUTH_FILE" || true)))
fi
mv "$htpasswd.tmp" "$htpasswd"
chmod 644 "$htpasswd"

# --- bearer API keys ----------------------------------------------------------------------
# One map from the Authorization header to the key's client id; whether a key is valid and its log id
# are derived from that id in voxbox.conf (one regex pass per request, not one per use).
clients_map="$gen/api_key_clients.map"
: > "$clients_map.tmp"
keys=0
seen_ids=" "
add_key() {
    key=$1
    case "$key" in
        *[!A-Za-z0-9._~+/=-]*) bad=1 ;;  # anything else, a newline included
        *) bad=$(( ${#key} < 16 || ${#key} > 256 )) ;;
    esac
    [ "$bad" = 0 ] || die "API key '$(printf %s "$key" | head -n1 | cut -c1-4)…' must be 16-256 characters of A-Z a-z 0-9 . _ ~ + / = -"
    # The worker counts usage under key:<16 hex of the key's sha256> (X-Client-Id), which an operator
    # computes the same way to set a key's quota; logs name a key by its first 8 (voxbox.conf).
    digest=$(printf '%s' "$key" | sha256sum | cut -c1-16)
    id=$(printf '%s' "$digest" | cut -c1-8)
    case "$seen_ids" in *" $id "*) echo "gateway: API key $id is listed twice; using it once" >&2; return ;; esac
    seen_ids="$seen_ids$id "
    # A regex entry ("~"), because nginx compares plain map strings without regard to case: a key
    # must match exactly, while the scheme is case-insensitive and may be followed by several spaces
    # (RFC 9110, 11.1 and 11.4). '.' and '+' are the only key characters special in a regex.
    pattern="^[Bb][Ee][Aa][Rr][Ee][Rr] +$(printf '%s' "$key" | sed 's/[.+]/[&]/g')\$"
    printf '"~%s" "key:%s";\n' "$pattern" "$digest" >> "$clients_map.tmp"
    keys=$((keys + 1))
}
old_ifs=$IFS; IFS=','
for key in $API_KEYS; do
    IFS=$old_ifs
    [ -n "$key" ] && add_key "$key"
done
IFS=$old_ifs
if [ -n "$API_KEYS_FILE" ]; then
    [ -f "$API_KEYS_FILE" ] && [ -r "$API_KEYS_FILE" ] || die "API_KEYS_FILE $API_KEYS_FILE is not a readable file"
    while IFS= read -r key || [ -n "$key" ]; do
        key=$(printf '%s' "$key" | tr -d '[:space:]')
        case "$key" in ""|\#*) continue ;; esac
        add_key "$key"
    done < "$API_KEYS_FILE"
fi
mv "$clients_map.tmp" "$clients_map"
chmod 644 "$clients_map"
[ $((users + keys)) -gt 0 ] || die "no credentials: set BASIC_AUTH_USERS (user:password) and/or API_KEYS; the gateway never runs open"

# --- IP allowlist -------------------------------------------------------------------------
valid_cidr() {
    addr=${1%/*}; bits=${1#"$addr"}; bits=${bits#/}
    case "$1" in */) return 1 ;; esac
    if printf '%s' "$addr" | grep -Eqx '([0-9]{1,3}\.){3}[0-9]{1,3}'; then
        max=32
        for octet in $(echo "$addr" | tr '.' ' '); do [ "$octet" -le 255 ] || return 1; done
    elif printf '%s' "$addr" | grep -Eqx '[0-9a-fA-F:.]*:[0-9a-fA-F:.]*'; then
        max=128
    else
        return 1
    fi
    [ -z "$bits" ] || { printf '%s' "$bits" | grep -Eqx '[0-9]{1,3}' && [ "$bits" -le "$max" ]; }
}
geo="$gen/allowlist.geo"
if [ -z "$ALLOW_CIDRS" ]; then
    echo "default 1;" > "$geo"
else
    echo "default 0;" > "$geo"
    set -f  # an entry like '*' must not expand to file names
    for cidr in $(echo "$ALLOW_CIDRS" | tr ',' ' '); do
        valid_cidr "$cidr" || die "ALLOW_CIDRS entry '$cidr' is not an IPv4/IPv6 address or CIDR (e.g. 10.0.0.0/8)"
        echo "$cidr 1;" >> "$geo"
    done
    set +f
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
    case "$TLS_CERT$TLS_KEY" in *[\"\;\$\\]*) die "TLS_CERT/TLS_KEY paths must not contain quotes, ';', '$' or '\\'" ;; esac
    cat > "$gen/listen.conf" <<LST
listen $GATEWAY_LISTEN ssl;
ssl_certificate "$TLS_CERT";
ssl_certificate_key "$TLS_KEY";
ssl_protocols TLSv1.2 TLSv1.3;
LST
    echo 'add_header Strict-Transport-Security "max-age=31536000" always;' >> "$headers"
else
    echo "listen $GATEWAY_LISTEN;" > "$gen/listen.conf"
fi

# --- the worker(s) ---------------------------------------------------------------------------
# Addresses get an upstream block: least_conn (a synthesis holds a worker for seconds, so the one with the
# fewest open requests is the least loaded) and keepalive. A 503 or a refused connection counts as a failure
# (synthesis routes retry elsewhere, see voxbox.conf): fail_timeout=2s keeps a full worker out of the
# rotation only briefly. A single server is never taken out.
# A name gets a resolver and a proxy_pass through a variable, which nginx resolves at request time (cached
# for valid=): every request is spread over all the addresses the name has (nginx rotates them at random
# on each lookup from its cache) and retried on another of them. An upstream block's "server name" is
# resolved once at start, and its open-source "resolve" parameter (with least_conn on a re-resolved name)
# needs nginx 1.27.3, while Debian 12 has 1.22; a variable proxy_pass cannot keep connections alive.
upstream_conf="$gen/upstream.conf"
is_address() {
    printf '%s' "$1" | grep -Eqx 'unix:.*|\[.*\]:[0-9]+' || printf '%s' "${1%:*}" | grep -Eqx '([0-9]{1,3}\.){3}[0-9]{1,3}'
}
case "$UPSTREAM" in *,*) list=1 ;; *) list=0 ;; esac
all_addresses=1
old_ifs=$IFS; IFS=','
for one in $UPSTREAM; do is_address "$one" || all_addresses=0; done
IFS=$old_ifs
if [ "$all_addresses" = 1 ] || [ "$RESOLVER" = off ]; then
    VOXBOX_UPSTREAM=voxbox_worker
    {
        printf 'upstream voxbox_worker {\n    least_conn;\n'
        old_ifs=$IFS; IFS=','
        for one in $UPSTREAM; do printf '    server %s max_fails=1 fail_timeout=2s;\n' "$one"; done
        IFS=$old_ifs
        printf '    keepalive 32;\n}\n'
    } > "$upstream_conf"
    how="address"; [ "$list" = 0 ] || how="$(printf '%s\n' "$UPSTREAM" | awk -F, '{ print NF }') addresses, least_conn"
    [ "$RESOLVER" != off ] || how="resolved once at start (RESOLVER=off)"
else
    [ "$list" = 0 ] || die "UPSTREAM='$UPSTREAM' lists names: a list must be IP addresses (or set RESOLVER=off to" \
        "resolve the names once at start); for workers that come and go, give one name that resolves to all of" \
        "them (a Compose service, a Kubernetes headless Service)"
    upstream_host=${UPSTREAM%:*}
    if [ -z "$RESOLVER" ] && [ -r "$RESOLV_CONF" ]; then
        # IPv6 servers need brackets in nginx; a link-local one with a zone (%eth0) cannot be used.
        RESOLVER=$(awk '$1 == "nameserver" && $2 !~ /%/ { print ($2 ~ /:/ ? "[" $2 "]" : $2) }' "$RESOLV_CONF" \
            | tr '\n' ' ' | sed 's/ *$//')
    fi
    [ -n "$RESOLVER" ] || die "UPSTREAM host '$upstream_host' is a name, and no DNS server was found in" \
        "$RESOLV_CONF to re-resolve it: set RESOLVER (e.g. 127.0.0.11 under Docker), RESOLVER=off to resolve" \
        "it once at start, or use an IP address"
    server='([A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9a-fA-F:]+\](:[0-9]{1,5})?)'
    check RESOLVER "$RESOLVER" "$server( +$server)*" \
        "DNS server addresses like '127.0.0.11' or '10.0.0.2:53 [::1]', or off"
    VOXBOX_UPSTREAM=$UPSTREAM
    # valid=5s overrides the record's TTL (Docker's DNS says 600 s): a worker on a new IP is reached
    # again within seconds, with no reload of the gateway.
    printf 'resolver %s valid=5s;\nresolver_timeout 3s;\n' "$RESOLVER" > "$upstream_conf"
    how="re-resolved through $RESOLVER"
fi

# --- JSON for every error nginx answers itself -------------------------------------------------
# A URI error page, never a named location: a request that failed in its request line has no URI
# yet, and nginx answers a redirect to a named location with a 500 ("empty URI in redirect").
errors="$gen/errors.conf"
: > "$errors"
error_json() {  # NAME "STATUSES" SENT-STATUS CODE MESSAGE [HEADER...]
    name=$1 statuses=$2 sent=$3 code=$4 message=$5
    shift 5
    {
        printf 'error_page %s = /__voxbox/error/%s;\n' "$statuses" "$name"
        # No body limit here: an error about a request with a large body must still be answered.
        printf 'location = /__voxbox/error/%s {\n    internal;\n    client_max_body_size 0;\n' "$name"
        printf '    include %s;\n' "$headers"
        for header in "$@"; do printf '    add_header %s always;\n' "$header"; done
        printf '    default_type application/json;\n'
        printf "    return %s '{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}%s';\n}\n" "$sent" "$code" "$message" '\n'
    } >> "$errors"
}
error_json bad_request 400 400 bad_request \
    "the gateway could not parse the request (malformed request line, path, header or chunked body, or no Host header); send a well-formed HTTP/1.1 request"
error_json headers_too_large 494 400 bad_request \
    "the request headers are too large for the gateway (cookies or a huge header?); send smaller headers"
error_json https_port 497 400 bad_request "plain HTTP was sent to the HTTPS port of the gateway; use https://"
error_json unauthorized 401 401 unauthorized \
    "log in (HTTP basic auth) or send Authorization: Bearer <API key>" \
    "WWW-Authenticate 'Basic realm=\"VoxBox\", charset=\"UTF-8\"'" "WWW-Authenticate 'Bearer realm=\"VoxBox\"'"
error_json forbidden 403 403 forbidden "your address is not in the gateway allowlist (ALLOW_CIDRS)"
error_json not_found 404 404 not_found "nothing is served at this path; see /openapi.json for the API"
error_json method_not_allowed 405 405 method_not_allowed \
    "the gateway does not pass TRACE or CONNECT; use one of the methods in the Allow header" \
    "Allow 'GET, HEAD, POST, DELETE'"
error_json request_timeout 408 408 request_timeout "the request was not sent in time; send it again without pausing"
error_json length_required 411 411 length_required "send a Content-Length header or a chunked body"
error_json payload_too_large 413 413 payload_too_large \
    "the request body is over the gateway limit ($MAX_JSON_BODY for JSON, $MAX_UPLOAD_BODY for voice uploads)"
error_json uri_too_long 414 414 uri_too_long \
    "the request URL is too long for the gateway; send long input in a JSON body instead"
error_json rate_limited 429 429 rate_limited \
    "too many requests or open streams from this client; retry after the Retry-After delay" "Retry-After 1"
error_json internal_error 500 500 internal_error \
    "the gateway failed on this request; retry, and if it persists see the gateway log for this X-Request-ID"
error_json not_implemented 501 501 not_implemented \
    "the gateway does not support this Transfer-Encoding (only chunked) or method; send a plain or chunked body"
error_json worker_unavailable "502 503 504" 503 worker_unavailable \
    "the TTS worker is not reachable (starting, pulling weights or restarting); retry shortly" "Retry-After 5"
error_json http_version_not_supported 505 505 http_version_not_supported \
    "the gateway speaks HTTP/1.0 and HTTP/1.1 on this port; send an HTTP/1.1 request"

health="$gen/health_server.conf"
if [ "$GATEWAY_HEALTH_LISTEN" = off ]; then
    : > "$health"
else
    cat > "$health" <<HLT
server {
    listen $GATEWAY_HEALTH_LISTEN;
    access_log off;
    include $errors;
    location / {
        default_type application/json;
        return 200 '{"status":"ok","checks":"the gateway (nginx) only; the worker answers /healthz on the main port"}\n';
    }
}
HLT
fi

# --- templates ------------------------------------------------------------------------------
# nginx refuses "burst=0": no burst is written as none.
VOXBOX_BURST=""
[ "$RATE_LIMIT_BURST" -eq 0 ] || VOXBOX_BURST="burst=$RATE_LIMIT_BURST nodelay"
export NGINX_PREFIX NGINX_WORKER_PROCESSES NGINX_ERROR_LOG_LEVEL NGINX_MIME_TYPES VOXBOX_UPSTREAM RATE_LIMIT_RPS \
    VOXBOX_BURST MAX_STREAMS_PER_CLIENT MAX_JSON_BODY MAX_UPLOAD_BODY PROXY_READ_TIMEOUT ACCESS_LOG UPSTREAM_TRIES
vars='${NGINX_PREFIX} ${NGINX_WORKER_PROCESSES} ${NGINX_ERROR_LOG_LEVEL} ${NGINX_MIME_TYPES} ${VOXBOX_UPSTREAM} ${RATE_LIMIT_RPS} ${VOXBOX_BURST} ${MAX_STREAMS_PER_CLIENT} ${MAX_JSON_BODY} ${MAX_UPLOAD_BODY} ${PROXY_READ_TIMEOUT} ${ACCESS_LOG} ${UPSTREAM_TRIES}'
envsubst "$vars" < "$NGINX_TEMPLATES/nginx.conf.template" > "$NGINX_PREFIX/nginx.conf"
envsubst "$vars" < "$NGINX_TEMPLATES/voxbox.conf.template" > "$NGINX_PREFIX/conf.d/voxbox.conf"
envsubst "$vars" < "$NGINX_TEMPLATES/voxbox_location.conf.template" > "$NGINX_PREFIX/voxbox_location.conf"
envsubst "$vars" < "$NGINX_TEMPLATES/voxbox_retry.conf.template" > "$NGINX_PREFIX/voxbox_retry.conf"
chmod 644 "$NGINX_PREFIX/nginx.conf" "$NGINX_PREFIX/conf.d/voxbox.conf" "$NGINX_PREFIX/voxbox_location.conf" \
    "$NGINX_PREFIX/voxbox_retry.conf" "$upstream_conf" "$errors" "$health"
echo "gateway: rendered $NGINX_PREFIX (upstream $UPSTREAM, $how; listen $GATEWAY_LISTEN, $users user(s), $keys API key(s))" >&2

# -e stderr: the error log nginx opens before it reads the config is fd 2 too, not a compiled-in path
# that an unprivileged user (the Helm chart runs nginx as uid 101) may not open.
case "${1:-}" in
    --render-only) exit 0 ;;
    --test) exec "$NGINX_BIN" -e stderr -t -p "$NGINX_PREFIX" -c "$NGINX_PREFIX/nginx.conf" ;;
    # What `docker compose exec gateway` runs to reload: a plain `nginx -s reload` reads the image's
    # default nginx.conf and looks for a pid file this config does not use.
    --reload) exec "$NGINX_BIN" -e stderr -p "$NGINX_PREFIX" -c "$NGINX_PREFIX/nginx.conf" -s reload ;;
esac
exec "$NGINX_BIN" -e stderr -p "$NGINX_PREFIX" -c "$NGINX_PREFIX/nginx.conf" -g 'daemon off;'
