# syntax=docker/dockerfile:1
# megatron_dgpo image: ONE Python environment with one torch and one NCCL for the trainer,
# Transformer Engine, (optionally) Apex and SGLang. The trainer ranks and the SGLang servers join
# one NCCL communicator for the weight broadcast, and NCCL refuses peers built with different
# versions, so they must not come from two environments (e.g. NGC's torch + a PyPI torch in a
# venv). As slime does, start from SGLang's own image, whose torch is the one the pinned sglang
# requires, freeze that torch / NCCL / Triton, and build Transformer Engine (and Apex) against it.
#
#   docker build -t megatron-dgpo:0.1.0 .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data megatron-dgpo:0.1.0 \
#       examples/train_dgpo.py --config examples/configs/r1_distill_qwen_1p5b.yaml data.train.path=/data/...
#   (the entry point is `torchrun --nproc_per_node=gpu`; put more torchrun options first for
#    multi-node: --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 ...)
#
# Multi-node NCCL (pass with -e / `--env` of examples/nemo_run_dgpo.py; see docs/cluster.md):
#   NCCL_SOCKET_IFNAME  interface for NCCL's bootstrap / socket traffic (e.g. ib0, bond0, eth0)
#   NCCL_IB_HCA         InfiniBand HCAs to use (e.g. mlx5_0,mlx5_1,... or ^mlx5_bond_0)
#   NCCL_IB_GID_INDEX   RoCE GID index (often 3 on RoCE v2 fabrics)
#   NCCL_NET_GDR_LEVEL  GPUDirect RDMA distance (e.g. PHB); NCCL_DEBUG=INFO to see what was picked
#   GLOO_SOCKET_IFNAME  same as NCCL_SOCKET_IFNAME, for torch.distributed's gloo groups
#
# Python in SGLang's CUDA 13 images is 3.12: megatron-core 0.17+ requires >= 3.12 (0.19.x here).
# tests/test_docker.py checks that the base image is SGLang's at SGLANG_VERSION, that TORCH_VERSION
# is the torch the pinned sglang wheel requires, and that nothing installs a second environment.

ARG SGLANG_VERSION=0.5.23
ARG SGLANG_IMAGE_TAG=v0.5.23-cu130
FROM lmsysorg/sglang:${SGLANG_IMAGE_TAG}

ARG SGLANG_VERSION=0.5.23
ARG SGLANG_ROUTER_VERSION=0.3.2
# torch of the base image = sglang 0.5.23's pin (Requires-Dist: torch==2.14.1); checked at build
ARG TORCH_VERSION=2.14.1
ARG MCORE_VERSION=0.19.2
ARG TE_VERSION=2.9.0
ARG TRANSFORMERS_VERSION=5.24.0
ARG MATH_VERIFY_VERSION=0.9.0
# Apex is optional for Megatron-Core (torch norms / optimizers otherwise); 1 builds it from source
ARG BUILD_APEX=0
ARG APP_USER=dgpo
ARG USER_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_DEBUG=WARN \
    HF_HUB_OFFLINE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# One torch, one NCCL: every later pip install is constrained to what SGLang's image holds.
RUN python -c "import torch, sglang; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
assert sglang.__version__ == '${SGLANG_VERSION}', sglang.__version__" \
    && pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|sglang|sglang-router|flashinfer[-_]python|nvidia-[^=]*)==' \
      > /etc/dgpo-constraints.txt \
    && grep -qiE '^torch==' /etc/dgpo-constraints.txt \
    && grep -qiE '^nvidia-nccl-[^=]*==' /etc/dgpo-constraints.txt \
    && cat /etc/dgpo-constraints.txt

ENV PIP_CONSTRAINT=/etc/dgpo-constraints.txt

# Transformer Engine compiled against this torch (the image is a CUDA devel image with nvcc).
RUN pip install "sglang-router==${SGLANG_ROUTER_VERSION}" \
    && pip install --no-build-isolation "transformer_engine[pytorch]==${TE_VERSION}" \
    && pip install \
      "megatron-core==${MCORE_VERSION}" \
      "transformers==${TRANSFORMERS_VERSION}" \
      "math-verify==${MATH_VERIFY_VERSION}"

# hadolint ignore=DL3003
RUN if [ "${BUILD_APEX}" = "1" ]; then \
      git clone --depth 1 https://github.com/NVIDIA/apex /tmp/apex && cd /tmp/apex \
      && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install --no-build-isolation . && rm -rf /tmp/apex; \
    fi

WORKDIR /opt/megatron_dgpo
COPY pyproject.toml README.md ./
COPY megatron_dgpo ./megatron_dgpo
COPY examples ./examples
COPY tools ./tools
# The local package itself (its remaining dependencies resolve within the constraints above).
# hadolint ignore=DL3013
RUN pip install ".[triton]" \
    && python -c "import megatron.core, megatron_dgpo, transformer_engine, sglang, torch; \
print('megatron-core', megatron.core.__version__, 'torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"

RUN useradd --create-home --uid "${USER_UID}" --shell /bin/bash "${APP_USER}" \
    && mkdir -p /opt/megatron_dgpo/outputs \
    && chown -R "${APP_USER}:${APP_USER}" /opt/megatron_dgpo/outputs
USER ${APP_USER}

ENTRYPOINT ["torchrun", "--nproc_per_node=gpu"]
CMD ["examples/train_dgpo.py", "--config", "examples/configs/embedded_cpu.yaml"]
