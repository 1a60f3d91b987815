#!/usr/bin/env bash
# Zero-downtime rollout of a new VoxBox release with docker compose, and rollback.
#
#   scripts/rollout.sh TAG [--dry-run]       roll out TAG
#   scripts/rollout.sh rollback [--dry-run]  go back to the tag before the last rollout
#
# Steps: pull TAG; start a second worker on TAG beside the running one; wait until Docker reports
# it healthy (/readyz: weights pulled, model loaded, warm-up passed); reload the gateway so it
# sends traffic to the new worker; stop the old worker gracefully (in-flight requests finish within
# its stop_grace_period); then the same for the gateway image; finally record TAG in .env.
# The previous tag is kept in .rollout-state for `rollback`.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
ARGS=()
for a in "$@"; do
    case "$a" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) ARGS+=("$a") ;;
    esac
done
[ ${#ARGS[@]} -eq 1 ] || { echo "usage: $0 TAG|rollback [--dry-run]" >&2; exit 2; }

ENV_FILE=${ENV_FILE:-.env}
STATE_FILE=${STATE_FILE:-.rollout-state}
COMPOSE=${COMPOSE:-docker compose}
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
run "$COMPOSE pull tts gateway"

old_ids=$($COMPOSE ps -q tts 2>/dev/null || true)
run "$COMPOSE up -d --no-deps --no-recreate --scale tts=2 tts"
new_id=""
if [ "$DRY" = 0 ]; then
    for id in $($COMPOSE ps -q tts); do
        case " $old_ids " in *" $id "*) ;; *) new_id=$id ;; esac
    done
    [ -n "$new_id" ] || { echo "rollout: the new worker did not start" >&2; exit 1; }
    echo "rollout: waiting for worker $new_id ($target) to be healthy (up to ${HEALTH_TIMEOUT_S}s)"
    deadline=$((SECONDS + HEALTH_TIMEOUT_S))
    while :; do
        status=$(docker inspect -f '{{.State.Health.Status}}' "$new_id" 2>/dev/null || echo gone)
        [ "$status" = healthy ] && break
        if [ "$status" = unhealthy ] || [ "$status" = gone ] || [ $SECONDS -ge $deadline ]; then
            echo "rollout: new worker is $status; removing it, $previous keeps serving" >&2
            docker rm -f "$new_id" >/dev/null
            $COMPOSE up -d --no-deps --no-recreate --scale tts=1 tts >/dev/null
            exit 1
        fi
        sleep 5
    done
else
    echo "+ wait until the new tts container's health status is healthy"
fi

# The gateway re-resolves the worker's name every few seconds by itself; a reload makes it see both
# workers now. A reload from inside the container, not `compose kill -s HUP`: Docker counts a
# signalled container as stopped by hand, and `unless-stopped` would then not restart it after a
# reboot (moby#41302).
RELOAD="exec -T gateway sh /opt/voxbox-gateway/render.sh --reload"
run "$COMPOSE $RELOAD"
for id in $old_ids; do
    run "docker stop --time 45 $id"
    run "docker rm $id"
done
run "$COMPOSE up -d --no-deps --no-recreate --scale tts=1 tts"
run "$COMPOSE $RELOAD"
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
