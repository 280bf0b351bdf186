#!/usr/bin/env bash
# Run mlfs in a container and share the mounted model with the host (or with other containers through
# a bind mount with shared propagation). Build once with:  docker build -t mlfs .
set -euo pipefail
mkdir -p /mnt/models /var/cache/mlfs
docker run -d --name mlfs-minilm \
  --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined \
  -e AWS_ENDPOINT_URL -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_DEFAULT_REGION \
  -v /var/cache/mlfs:/var/cache/mlfs \
  -v /mnt/models:/models:rshared \
  mlfs mount --foreground --allow-other --cache-size 20G \
       --store s3://models --id minilm --version v1 /models/minilm
# The inference container sees the model as plain files:
#   docker run --rm -v /mnt/models:/models:rslave my-inference python serve.py /models/minilm
# Stop: docker stop mlfs-minilm  (SIGTERM unmounts cleanly)
