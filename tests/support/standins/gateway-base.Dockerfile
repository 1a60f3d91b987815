# Test stand-in for nginx:1.27-alpine (no registry is reachable from the test machines), on Debian.
# What the product's gateway Dockerfile relies on: nginx at /usr/sbin/nginx with /etc/nginx/mime.types,
# envsubst, wget (its HEALTHCHECK), /bin/sh, SIGQUIT as the stop signal (graceful), and `apk add`,
# which a shim maps to apt-get so the product's own `RUN apk add --no-cache openssl` really installs it.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light gettext-base wget \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /etc/nginx/sites-enabled/* \
    && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
COPY apk /sbin/apk
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
