# Test stand-in for pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime (no registry is reachable from
# the test machines). What the product's worker Dockerfile relies on: a Python with pip at
# /opt/conda/bin (first on PATH) whose site-packages already hold torch 2.14.1 and everything it
# requires, so `pip install --prefix=/deps` adds no second torch. The torch files come from the
# test virtualenv (the same wheels), hard-linked into the build context by tests/support/docker_bundle.py.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && python3 -m venv /opt/conda
ENV PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# The host's pip settings (index and CA bundle) so the product build's pip reaches PyPI from here.
COPY pip.conf /etc/pip.conf
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY site-packages/ /opt/conda/lib/python3.11/site-packages/
WORKDIR /workspace
