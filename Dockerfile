# syntax=docker/dockerfile:1
# megatron_dgpo trainer image: NGC PyTorch (CUDA, cuDNN, NCCL, Transformer Engine, Apex, Python 3.12)
# + megatron-core 0.19.x + this package; SGLang in its own virtualenv (/opt/sglang) so that its
# PyPI torch never replaces the NGC build that Transformer Engine and Apex were compiled against.
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
#   NCCL_P2P_DISABLE / NCCL_SHM_DISABLE only for debugging single-node problems
#
# Python in the NGC 25.10 image is 3.12: megatron-core 0.17+ requires >= 3.12 (0.19.x here).

ARG NGC_TAG=25.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

# Pinned versions; tests/test_docker.py checks them against pyproject.toml's ranges.
ARG MCORE_VERSION=0.19.2
ARG SGLANG_VERSION=0.5.23
ARG SGLANG_ROUTER_VERSION=0.3.2
ARG TRANSFORMERS_VERSION=5.24.0
ARG MATH_VERIFY_VERSION=0.9.0
ARG APP_USER=dgpo
ARG USER_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_DEBUG=WARN \
    DGPO_SGLANG_PYTHON=/opt/sglang/bin/python \
    HF_HUB_OFFLINE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Keep the image's CUDA builds of torch / TE / apex / triton: every later pip install is
# constrained to the versions already installed.
RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|transformer[-_]engine[^=]*|apex|triton|flash[-_]attn|nvidia-[^=]*)==' \
      > /etc/dgpo-constraints.txt \
    && cat /etc/dgpo-constraints.txt

ENV PIP_CONSTRAINT=/etc/dgpo-constraints.txt

RUN pip install \
      "megatron-core==${MCORE_VERSION}" \
      "transformers==${TRANSFORMERS_VERSION}" \
      "math-verify==${MATH_VERIFY_VERSION}"

# SGLang servers (disaggregated rollouts) run from their own environment:
#   $DGPO_SGLANG_PYTHON -m sglang.launch_server ...   (examples/nemo_run_dgpo.py does this)
# The colocated in-process engine (rollout.sglang.mode=colocated) needs sglang importable next to
# the trainer's torch: use an image whose torch matches sglang's pin for that mode.
RUN python -m venv /opt/sglang \
    && env -u PIP_CONSTRAINT /opt/sglang/bin/pip install \
      "sglang==${SGLANG_VERSION}" "sglang-router==${SGLANG_ROUTER_VERSION}"

WORKDIR /opt/megatron_dgpo
COPY pyproject.toml README.md ./
COPY megatron_dgpo ./megatron_dgpo
COPY examples ./examples
COPY tools ./tools
# The local package itself (its remaining dependencies resolve within the constraints above).
# hadolint ignore=DL3013
RUN pip install ".[triton]" \
    && python -c "import megatron.core, megatron_dgpo; print('megatron-core', megatron.core.__version__)"

RUN useradd --create-home --uid "${USER_UID}" --shell /bin/bash "${APP_USER}" \
    && mkdir -p /opt/megatron_dgpo/outputs \
    && chown -R "${APP_USER}:${APP_USER}" /opt/megatron_dgpo/outputs
USER ${APP_USER}

ENTRYPOINT ["torchrun", "--nproc_per_node=gpu"]
CMD ["examples/train_dgpo.py", "--config", "examples/configs/embedded_cpu.yaml"]
