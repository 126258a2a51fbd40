#!/usr/bin/env bash
# GPU checks in one run (~5 minutes on one H100): the GPU-marked tests, the CPU (gloo) test suite
# against the megatron-core of this machine, and the CUDA benchmarks.
#
#   bash tools/gpu_check.sh [OUT_DIR]
#   STAGES="tests job" bash tools/gpu_check.sh OUT_DIR    # a subset (default: all stages)
#
# Stages: tests (GPU-marked tests; the CPU suite against this machine's megatron-core runs beside
# them), job (the main job on one GPU, bf16, then --resume), sweep (Triton kernel block/warp
# sweep), bench (bench_logprob, bench_lm_head and bench_weight_sync on CUDA).
#
# Needs python3 with CUDA torch (the lent H100/H200 image has torch 2.11, Triton, pytest,
# pytest-xdist, hypothesis, transformers, safetensors, tokenizers, pyyaml; not megatron-core or
# math-verify). Wheels in .whl/ are installed first (a GPU machine without registry access); fetch
# them here beforehand with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2 math-verify==0.9.0 \
#       latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
# and carry .whl with the run. Everything printed goes to OUT_DIR/gpu_check.log, the CPU suite's
# output to OUT_DIR/cpu_suite.log. Each stage has its own time limit; a failing stage does not stop
# the others; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L
python3 - <<'PY'
import torch, importlib
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
for m in ("megatron.core", "transformer_engine", "sglang", "triton", "transformers", "math_verify"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "not available:", type(e).__name__)
PY

STAGES=${STAGES:-tests job sweep bench}
has() { [[ " $STAGES " == *" $1 "* ]]; }
status=0
start=$SECONDS
if has tests; then
# The CPU suite (CUDA hidden: gloo) against this machine's megatron-core, in the background while
# the GPU tests run. nemo-run and hadolint are not on the GPU image. The Triton-interpreter variants
# are deselected: triton 3.6's interpreter fails under numpy 2.5 (int() of a 1-element array in its
# range() handling); here the Triton backend runs compiled, in the GPU tests.
CUDA_VISIBLE_DEVICES="" timeout 330 python3 -m pytest -q -n 6 --dist loadfile -p no:cacheprovider tests \
  --ignore=tests/test_launch.py --ignore=tests/test_docker.py -k "not triton" > "$OUT/cpu_suite.log" 2>&1 &
cpu_pid=$!

echo "== GPU-marked tests"
timeout 300 python3 -m pytest -q -m "gpu or te" -p no:cacheprovider tests/test_ops_logprobs.py \
  tests/test_megatron_cuda.py tests/test_megatron_fp8.py tests/test_rollout_hf.py tests/test_ops_lm_head.py || status=1
echo "== loss library on CUDA (float32 / bfloat16 inputs)"
python3 - <<'PY' || status=1
import torch
from megatron_dgpo.loss import PolicyLossConfig, policy_loss, registered_losses
for name in registered_losses():
    for dt in (torch.float32, torch.bfloat16):
        lp = (-torch.rand(8, 64, device="cuda") * 3).to(dt).requires_grad_()
        old = lp.detach().float() + torch.randn(8, 64, device="cuda") * 0.5
        loss, m = policy_loss(PolicyLossConfig(name=name), lp, old, torch.randn(8, device="cuda"),
                              torch.ones(8, 64, dtype=torch.bool, device="cuda"))
        loss.backward()
        assert torch.isfinite(lp.grad.float()).all(), (name, dt)
print("policy losses finite on CUDA: ok")
PY
echo "== CPU suite (megatron-core of this machine, CUDA hidden): waiting"
wait $cpu_pid || status=1
tail -n 25 "$OUT/cpu_suite.log"
echo "(elapsed ${SECONDS}s / $((SECONDS - start))s since the tests started)"
fi
if has job; then
  echo "== main job on one GPU (embedded task, TP=1, bf16 params, 20 RL steps, then --resume to 22)"
  job=(examples/train_dgpo.py --config examples/configs/embedded_cpu.yaml parallel.tensor_model_parallel_size=1
       parallel.params_dtype=bfloat16 parallel.use_distributed_optimizer=true algo.steps=20 eval.every=10
       save_every=10 output_dir=/tmp/job warmstart.cache_dir=/tmp/job_cache)
  timeout 150 python3 -m torch.distributed.run --nproc_per_node 1 "${job[@]}" --overwrite 2>&1 | grep -v Warning | tail -n 25 || status=1
  timeout 60 python3 -m torch.distributed.run --nproc_per_node 1 "${job[@]}" algo.steps=22 --resume 2>&1 | grep -v Warning | tail -n 8 || status=1
  cp /tmp/job/metrics.jsonl "$OUT/job_metrics.jsonl" 2>/dev/null || { echo "no metrics.jsonl"; status=1; }
fi
if has sweep; then
echo "== Triton kernel sweep (T=16384, V=151936, bf16)"
timeout 150 python3 tools/sweep_triton_logprob.py --blocks 2048,4096,8192 --warps 4,8,16 || status=1
fi
if has bench; then
echo "== bench_logprob (CUDA, bf16)"
timeout 240 python3 tools/bench_logprob.py --device cuda --dtype bf16 \
  --methods dgpo_triton,dgpo_torch,naive,megatron || status=1
echo "== bench_lm_head (CUDA, bf16, H=1536, V=151936, T=16384,65536)"
timeout 240 python3 tools/bench_lm_head.py --device cuda || status=1
echo "== bench_weight_sync (CUDA)"
timeout 120 python3 tools/bench_weight_sync.py --device cuda --reps 3 || status=1
fi
echo "gpu_check status: $status (${SECONDS}s)"
exit $status
