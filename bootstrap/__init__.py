"""Container entrypoint: pull model weights from S3/OSS into the volume, verify, hand off to gunicorn."""
