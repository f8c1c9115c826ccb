# hnd-server: the tail of a split R-CNN behind gRPC, on an NVIDIA GPU (falls back to CPU with --device auto).
#
# Build (from the repository root; the context is the root, see .dockerignore):
#   docker build -f docker/server.Dockerfile -t hnd-server:0.1.0 .
#   podman build --format docker -f docker/server.Dockerfile -t hnd-server:0.1.0 .   # keeps HEALTHCHECK
# Run (weights mounted read-only at /models, TLS files and token at /run/secrets):
#   docker run -d --gpus all -p 50051:50051 -p 9100:9100 -v /srv/hnd/models:/models:ro hnd-server:0.1.0
# See DEPLOY.md for TLS, tokens, metrics and batching.
#
# CUDA: the torch / torchvision wheels on PyPI are CUDA builds that carry their own CUDA runtime
# libraries (nvidia-* wheels), so a plain Python base image is enough; the host needs only the
# NVIDIA driver and the NVIDIA Container Toolkit (docker --gpus / CDI).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# Pinned to constraints.txt (tests/test_docker.py checks they agree; pip -c enforces it at build time).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PYPI_INDEX_URL=https://pypi.org/simple

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/hnd \
    PATH=/opt/hnd/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN python3 -m venv /opt/hnd \
 && pip install "setuptools>=77" wheel

WORKDIR /src

# 1. Dependencies only (this layer is rebuilt only when pyproject.toml or constraints.txt change).
COPY pyproject.toml constraints.txt ./
RUN pip install -c constraints.txt --index-url "${PYPI_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > /tmp/requirements.txt \
 && pip install -c constraints.txt --index-url "${PYPI_INDEX_URL}" -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2. The hnd package itself (cheap to rebuild when the source changes).
COPY README.md LICENSE ./
COPY hnd_init ./hnd_init
COPY common ./common
COPY proto ./proto
COPY server ./server
COPY edge ./edge
COPY train ./train
COPY bench ./bench
COPY configs ./configs
RUN pip install --no-deps --no-build-isolation . \
 && rm -rf build *.egg-info \
 && hnd-server --help > /dev/null

# 3. Unprivileged user; weights are mounted read-only at /models.
RUN groupadd --system --gid 10001 hnd \
 && useradd --system --uid 10001 --gid hnd --home-dir /home/hnd --create-home --shell /usr/sbin/nologin hnd \
 && mkdir -p /models
USER hnd
WORKDIR /home/hnd

LABEL org.opencontainers.image.title="hnd-server" \
      org.opencontainers.image.description="Split-computing R-CNN tail served over gRPC (HND/GHND)" \
      org.opencontainers.image.licenses="MIT"

# gRPC (SplitInference, grpc.health.v1, reflection) and Prometheus /metrics (bound to all of the container's
# addresses by --metrics-host 0.0.0.0: publish it on the host's loopback or a private network only).
EXPOSE 50051 9100

# Plain-text probe on loopback. With TLS, override it with --tls-ca (docker/compose.yaml shows how);
# the server certificate then needs IP:127.0.0.1 / DNS:localhost in its SAN (DEPLOY.md).
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
  CMD ["hnd-healthcheck", "--server", "127.0.0.1:50051", "--timeout", "5"]

# SIGTERM drains in-flight requests; give `docker stop` enough time (e.g. --stop-timeout 30).
STOPSIGNAL SIGTERM
ENTRYPOINT ["hnd-server"]
CMD ["--config", "hnd/faster_rcnn-b3ch", "--checkpoint", "/models/model.pt", "--device", "auto", \
     "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9100", "--metrics-host", "0.0.0.0"]
