# VoxBox gateway: the official nginx image + our templates; render.sh writes the config (and the
# htpasswd / API-key maps) from the environment at start, then runs nginx in the foreground.
ARG NGINX_IMAGE=nginx:1.27-alpine
FROM ${NGINX_IMAGE}
# openssl hashes the basic-auth passwords at start (apr1). Not version-pinned: Alpine drops old
# package versions from its index, so a pin would break rebuilds; the base image tag pins the set.
# hadolint ignore=DL3018
RUN apk add --no-cache openssl
COPY nginx/ /opt/voxbox-gateway/
ENV NGINX_PREFIX=/etc/nginx/voxbox \
    NGINX_TEMPLATES=/opt/voxbox-gateway/templates \
    GATEWAY_LISTEN=6006 \
    UPSTREAM=tts:8000
EXPOSE 6006
# render.sh's loopback health listener (GATEWAY_HEALTH_LISTEN), not /healthz: that one asks the worker,
# and a worker restarting must not mark the gateway unhealthy; it also answers when TLS is on.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["wget", "-qO", "/dev/null", "http://127.0.0.1:6007/"]
# nginx finishes open requests and streams on SIGQUIT and cuts them on SIGTERM. The base image says so
# already; stated here so a rollout (compose, Kubernetes) drains the gateway whatever the base becomes.
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/bin/sh", "/opt/voxbox-gateway/render.sh"]
# Last: these change with every release, so everything above stays cached (and is not pushed again).
ARG VERSION=dev
ARG GIT_REVISION=unknown
LABEL org.opencontainers.image.title="voxbox-gateway" \
      org.opencontainers.image.description="VoxBox gateway: auth, rate limits, streaming pass-through" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
