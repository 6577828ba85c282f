# A GPU worker: CUDA runtime, torch, transformers and joycap-queue, running as a non-root user.
# The Hugging Face cache (the 17 GB model) lives on a volume at /cache, so it downloads once.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the index of the CUDA build that matches the base image, so the project's
# install keeps it instead of pulling another build.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY joycap_queue ./joycap_queue
COPY worker ./worker
RUN pip install ".[worker]"

RUN useradd --create-home --uid 1000 joycap \
    && mkdir -p /cache /inbox \
    && chown joycap:joycap /cache /inbox
USER joycap
VOLUME ["/cache"]

CMD ["joycap-queue", "worker"]
