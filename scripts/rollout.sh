#!/usr/bin/env bash
# Zero-downtime rollout of a new VoxBox release with docker compose, and rollback.
#
#   scripts/rollout.sh TAG [--dry-run]       roll out TAG
#   scripts/rollout.sh rollback [--dry-run]  go back to the tag before the last rollout
#
# Steps: pull TAG; create as many new worker containers on TAG as are running (at least one; a service
# scaled with `up --scale tts=N` keeps its N) beside the running ones and check they run TAG's image;
# start them without the service name `tts` (so the gateway sends them nothing yet); wait until Docker
# reports each healthy (/readyz: weights pulled, model loaded, warm-up passed); give them the name `tts`
# and reload the gateway; stop the old workers gracefully (in-flight requests finish within the stop
# grace period); then recreate the gateway on TAG; finally record TAG in .env.
# The previous tag is kept in .rollout-state for `rollback`. If a new worker fails or never turns
# healthy, every new one is removed and the old ones keep serving. Meanwhile the box runs twice the
# workers (GPU memory for both). Stopped or never-started tts containers (an old replica, a failed
# earlier attempt) are removed first: they are not serving, and compose would reuse them.
#
# COMPOSE is the compose command (default: `docker compose`, plus `-f compose.yaml -f compose.cpu.yaml`
# when COMPOSE_FILE is unset and the engine has no nvidia runtime, i.e. a CPU-only host).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
ARGS=()
for a in "$@"; do
    case "$a" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) ARGS+=("$a") ;;
    esac
done
[ ${#ARGS[@]} -eq 1 ] || { echo "usage: $0 TAG|rollback [--dry-run]" >&2; exit 2; }

ENV_FILE=${ENV_FILE:-.env}
STATE_FILE=${STATE_FILE:-.rollout-state}
if [ -z "${COMPOSE:-}" ]; then
    COMPOSE="docker compose"
    # compose.yaml reserves an NVIDIA GPU for the worker; without the nvidia runtime that `up` fails
    # ("could not select device driver"), so a CPU host needs compose.cpu.yaml as well.
    if [ -z "${COMPOSE_FILE:-}" ] && ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
        COMPOSE="docker compose -f compose.yaml -f compose.cpu.yaml"
    fi
fi
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-45}
SWITCH_WAIT_S=${SWITCH_WAIT_S:-7}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-1800}

run() {
    echo "+ $*"
    [ "$DRY" = 1 ] || eval "$@"
}

# The VOXBOX_TAG line in any form compose accepts: `export ` prefix, spaces around =, quotes, CRLF,
# an inline comment.
TAG_LINE='^[[:space:]]*(export[[:space:]]+)?VOXBOX_TAG[[:space:]]*='

current_tag() {
    local tag
    tag=$(grep -E "$TAG_LINE" "$ENV_FILE" 2>/dev/null | tail -n1 | sed -E "s/$TAG_LINE//" | tr -d '\r' \
        | sed -E 's/[[:space:]]+#.*$//; s/^[[:space:]]+//; s/[[:space:]]+$//; s/^"(.*)"$/\1/'"; s/^'(.*)'\$/\\1/")
    echo "${tag:-latest}"
}

valid_tag() {
    [[ $1 =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]  # the whole string: a newline cannot slip through
}

[ -f "$ENV_FILE" ] || { echo "rollout: $ENV_FILE not found; cp .env.example .env and fill it in first" >&2; exit 1; }

target=${ARGS[0]}
if [ "$target" = rollback ]; then
    [ -s "$STATE_FILE" ] || { echo "rollout: nothing to roll back to ($STATE_FILE is missing)" >&2; exit 1; }
    [ "$(wc -l < "$STATE_FILE")" -le 1 ] && valid_tag "$(tr -d '\n' < "$STATE_FILE")" \
        || { echo "rollout: $STATE_FILE should hold one image tag; fix or delete it" >&2; exit 1; }
    target=$(tr -d '\n' < "$STATE_FILE")
    echo "rollout: rolling back to $target"
fi
valid_tag "$target" || { echo "rollout: '$target' is not a valid image tag" >&2; exit 2; }
previous=$(current_tag)
[ "$previous" != "$target" ] || { echo "rollout: $target is already running"; exit 0; }

export VOXBOX_TAG=$target
echo "rollout: compose command: $COMPOSE"
run "$COMPOSE pull tts gateway"
# Bind-mounted into the gateway: made here, owned by whoever runs the rollout (Docker would make it root's).
[ -d secrets ] || run "mkdir -p secrets"

# The gateway is reloaded in place (a signal to PID 1 would count as a manual stop for `restart:`).
reload_gateway() {  # renders again (key and password files may have changed), then reloads in place
    run "$COMPOSE exec -T gateway sh /opt/voxbox-gateway/render.sh --reload"
}
tts_ids() {  # STATUS (running, exited, ...): ids of the project's tts containers in that state
    $COMPOSE ps -q -a --status "$1" tts 2>/dev/null || true
}

if [ "$DRY" = 0 ]; then
    for status in exited created dead paused restarting; do
        for id in $(tts_ids "$status"); do
            echo "rollout: removing tts container $id ($status, not serving)"
            docker rm -f "$id" >/dev/null
        done
    done
else
    echo "+ remove tts containers that are not running (stopped replicas, leftovers of a failed rollout)"
fi
old_ids=$(tts_ids running)
n_old=$(echo "$old_ids" | wc -w)
n_new=$(( n_old > 0 ? n_old : 1 ))
want_image=$($COMPOSE config --images tts 2>/dev/null || echo "?")

new_tts_ids() {  # the tts containers this attempt created: every one that was not running before it
    local id
    for id in $($COMPOSE ps -q -a tts 2>/dev/null); do
        case " $(echo $old_ids) " in *" $id "*) ;; *) echo "$id" ;; esac
    done
}
# Remove whatever this attempt created, so a later rollout never finds (and compose never reuses) it.
remove_new() {
    for id in $(new_tts_ids); do docker rm -f "$id" >/dev/null 2>&1 || true; done
}

# The gateway re-resolves the name `tts` every few seconds: a worker carrying that name gets requests
# at once, before its model is loaded. So the new worker is created without it (reachable only by its
# container name while it starts), and takes the name once it is healthy.
networks_of() {
    docker inspect -f '{{range $net, $_ := .NetworkSettings.Networks}}{{$net}} {{end}}' "$1"
}
set_service_name() {  # ID on|off: (re)join the container's networks with or without the alias `tts`
    local net
    for net in $(networks_of "$1"); do
        docker network disconnect "$net" "$1" >/dev/null
        if [ "$2" = on ]; then docker network connect --alias tts "$net" "$1"; else docker network connect "$net" "$1"; fi
    done
}

if ! run "$COMPOSE up --no-start --no-deps --no-recreate --scale tts=$((n_old + n_new)) tts"; then
    remove_new
    echo "rollout: starting a worker on $target failed (see above); removed what it created, $previous keeps serving" >&2
    exit 1
fi
if [ "$DRY" = 0 ]; then
    new_ids=$(echo $(new_tts_ids))
    if [ "$(echo "$new_ids" | wc -w)" -ne "$n_new" ]; then
        remove_new
        echo "rollout: expected $n_new new worker container(s), found '${new_ids}'; removed, $previous keeps serving" >&2
        exit 1
    fi
    for new_id in $new_ids; do
        got_image=$(docker inspect -f '{{.Config.Image}}' "$new_id")
        if [ "$got_image" != "$want_image" ]; then
            remove_new
            echo "rollout: the new worker $new_id runs $got_image, not $want_image; removed, $previous keeps serving" >&2
            exit 1
        fi
        if ! { set_service_name "$new_id" off && docker start "$new_id" >/dev/null; }; then
            remove_new
            echo "rollout: the new worker $new_id did not start; removed, $previous keeps serving" >&2
            exit 1
        fi
    done
    echo "rollout: waiting for worker(s) $new_ids ($want_image) to be healthy (up to ${HEALTH_TIMEOUT_S}s)"
    deadline=$((SECONDS + HEALTH_TIMEOUT_S))
    for new_id in $new_ids; do
        while :; do
            status=$(docker inspect -f '{{.State.Health.Status}}' "$new_id" 2>/dev/null || echo gone)
            [ "$status" = healthy ] && break
            if [ "$status" = unhealthy ] || [ "$status" = gone ] || [ $SECONDS -ge $deadline ]; then
                [ $SECONDS -lt $deadline ] || status="not healthy after ${HEALTH_TIMEOUT_S}s"
                echo "rollout: new worker $new_id is $status; removing it, $previous keeps serving" >&2
                remove_new
                exit 1
            fi
            sleep 2
        done
    done
    for new_id in $new_ids; do
        echo "rollout: worker $new_id is healthy; it takes the name tts"
        if ! set_service_name "$new_id" on; then
            remove_new
            echo "rollout: could not give worker $new_id the name tts; removed, $previous keeps serving" >&2
            exit 1
        fi
    done
else
    echo "+ check the new tts container(s) run $want_image; start them without the name tts"
    echo "+ wait until their health status is healthy; then give them the name tts"
fi

# The gateway sends new requests to the healthy worker(s) it resolves; a reload makes it look now.
reload_gateway
# Before the old worker goes, every gateway process must know the new one: nginx workers of the config
# before the reload still take connections for a moment, with the name resolved when only the old
# worker had it (cached up to 5 s, the resolver's valid=). Stopping the old one sooner fails those.
run "sleep $SWITCH_WAIT_S"
# One old worker at a time: a gateway process that still has a stopped worker's address cached (up to 5 s)
# spends the connect timeout on it before retrying elsewhere (a removed container's address does not
# refuse, it is silent); several such addresses could use up a request's whole 10 s retry budget.
left=$n_old
for id in $old_ids; do
    run "docker stop --timeout $STOP_TIMEOUT_S $id"
    run "docker rm $id"
    left=$((left - 1))
    if [ "$left" -gt 0 ]; then
        reload_gateway  # forgets the stopped worker's address now
        run "sleep $SWITCH_WAIT_S"
    fi
done
reload_gateway
run "$COMPOSE up -d --no-deps gateway"

if [ "$DRY" = 0 ]; then
    echo "$previous" > "$STATE_FILE"
    if grep -qE "$TAG_LINE" "$ENV_FILE" 2>/dev/null; then
        sed -i.bak -E "s/$TAG_LINE.*/VOXBOX_TAG=$target/" "$ENV_FILE" && rm -f "$ENV_FILE.bak"
    else
        # A file that does not end in a newline would glue the tag onto its last setting.
        [ ! -s "$ENV_FILE" ] || [ -z "$(tail -c1 "$ENV_FILE")" ] || echo >> "$ENV_FILE"
        echo "VOXBOX_TAG=$target" >> "$ENV_FILE"
    fi
else
    echo "+ record $previous in $STATE_FILE and VOXBOX_TAG=$target in $ENV_FILE"
fi
echo "rollout: now serving $target (previous: $previous; 'scripts/rollout.sh rollback' returns to it)"
