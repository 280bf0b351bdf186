# mlfs in a container. It installs through scripts/setup.sh, the same script `make test` and CI use,
# so the image and CI cannot drift. Needs FUSE at run time:
#   docker run --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined ...
# (examples/docker-run.sh and examples/kubernetes-sidecar.yaml show complete set-ups).
FROM python:3.11-slim-bookworm

WORKDIR /opt/mlfs
COPY pyproject.toml README.md Makefile ./
COPY scripts/ scripts/
COPY mlfs/ mlfs/
# The runtime needs neither torch nor the test tools: MLFS_EXTRAS= installs the core only.
RUN MLFS_EXTRAS= bash scripts/setup.sh \
 && rm -rf /root/.cache/pip /var/lib/apt/lists/*
ENV PATH=/opt/mlfs/.venv/bin:$PATH \
    MLFS_CACHE_DIR=/var/cache/mlfs

ENTRYPOINT ["mlfs"]
# e.g. docker run ... IMAGE mount --foreground --store s3://models --id minilm --version v1 /models
CMD ["--help"]
