# hnd-edge: camera -> head on ONNX Runtime -> quantized bottleneck -> gRPC, on a CPU-only device. No torch.
#
# Build (from the repository root):
#   docker build -f docker/edge.Dockerfile -t hnd-edge:0.1.0 .
#   docker buildx build --platform linux/arm64 -f docker/edge.Dockerfile -t hnd-edge:0.1.0 .   # ARM boards
# Run with a camera and the head exported to ONNX (`hnd-export-head full.pt head.onnx`, on a machine with
# torch), so the device never holds the tail:
#   docker run --rm --init --device /dev/video0 --group-add "$(stat -c %g /dev/video0)" \
#     -v "$PWD/head.onnx:/models/head.onnx:ro" hnd-edge:0.1.0 \
#     --server gpu-host:50051 --camera 0 --head /models/head.onnx
# See DEPLOY.md for TLS, tokens and the compose file.
#
# The image installs hnd's core and its `edge` and `video` extras (onnxruntime; PyAV for the H.264 offload
# mode): no torch, no CUDA libraries.
# The build fails if torch slipped in.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG PYPI_INDEX_URL=https://pypi.org/simple

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/hnd \
    PATH=/opt/hnd/bin:$PATH

RUN python3 -m venv /opt/hnd \
 && pip install "setuptools>=77" wheel

WORKDIR /src

# 1. Dependencies only (this layer is rebuilt only when pyproject.toml or constraints.txt change).
COPY pyproject.toml constraints.txt ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['edge'] + p['optional-dependencies']['video']))" > /tmp/requirements.txt \
 && pip install -c constraints.txt --index-url "${PYPI_INDEX_URL}" -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && python3 -c "import importlib.util as u; assert u.find_spec('torch') is None, 'the edge image must not hold torch'"

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
 && hnd-edge --help > /dev/null

# 3. Unprivileged user in the `video` group (camera devices); head weights at /models, results in /out.
RUN groupadd --system --gid 10001 hnd \
 && useradd --system --uid 10001 --gid hnd --groups video --home-dir /home/hnd --create-home \
      --shell /usr/sbin/nologin hnd \
 && mkdir -p /models /out \
 && chown hnd:hnd /out
USER hnd
WORKDIR /home/hnd

LABEL org.opencontainers.image.title="hnd-edge" \
      org.opencontainers.image.description="Split-computing R-CNN head on the edge device: camera to quantized bottleneck over gRPC (HND/GHND)" \
      org.opencontainers.image.licenses="MIT"

# `docker stop` sends SIGINT: hnd-edge stops like on Ctrl-C, writes --output and prints its summary.
STOPSIGNAL SIGINT
ENTRYPOINT ["hnd-edge"]
CMD ["--server", "server:50051", "--camera", "0", "--config", "hnd/faster_rcnn-b3ch", "--head", "/models/head.onnx", \
     "--output", "/out/results.jsonl"]
