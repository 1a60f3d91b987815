# VoxBox TTS worker: gunicorn + Flask, VoxCPM on CUDA (CPU fallback). No weights inside: the
# entrypoint (python -m bootstrap) pulls them into the /models volume, then execs gunicorn.
# The base carries the same torch as requirements/runtime.txt, so pip adds no second copy.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

FROM ${BASE_IMAGE} AS deps
# The embedded (Piper) engine's phonemizer and espeak-ng are GPL-3.0: only in images built with
# --build-arg WITH_EMBEDDED=1; a VoxCPM deployment does not need them.
ARG WITH_EMBEDDED=0
WORKDIR /build
COPY requirements/ requirements/
RUN pip install --no-cache-dir --prefix=/deps -r requirements/runtime.txt \
    && pip install --no-cache-dir --prefix=/deps --no-deps -r requirements/voxcpm.txt \
    && if [ "$WITH_EMBEDDED" = 1 ]; then pip install --no-cache-dir --prefix=/deps -r requirements/embedded.txt; fi

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODELS_DIR=/models \
    VOICES_DIR=/models/voices \
    TTS_ENGINE=voxcpm \
    BIND=0.0.0.0:8000
COPY --from=deps /deps /opt/conda
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin voxbox \
    && mkdir -p /models /app \
    && chown voxbox:voxbox /models /app
WORKDIR /app
COPY --chown=voxbox:voxbox service/ service/
COPY --chown=voxbox:voxbox bootstrap/ bootstrap/
USER 10001
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["python", "-m", "bootstrap"]
# Last: these change with every release, so everything above stays cached (and is not pushed again).
ARG VERSION=dev
ARG GIT_REVISION=unknown
LABEL org.opencontainers.image.title="voxbox-worker" \
      org.opencontainers.image.description="VoxBox TTS worker (VoxCPM-1.5, gunicorn + Flask)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
