"""NeMo-Run launch: config validation, Slurm dry-run scripts (plain and disaggregated SGLang),
a local torchrun job to completion and a failing job reported as a failure, GPU configs."""
from __future__ import annotations

import http.server
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from megatron_dgpo.config import TrainConfig
from megatron_dgpo.configio import ConfigError, load_config
from megatron_dgpo.launch import SGLangServeSpec, SlurmSpec, spec
from megatron_dgpo.launch import wait_then_train as wtt

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = str(REPO / "examples" / "configs" / "embedded_cpu.yaml")


def _cli():
    s = importlib.util.spec_from_file_location("nemo_run_dgpo", REPO / "examples" / "nemo_run_dgpo.py")
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- GPU configs (no nemo-run)
@pytest.mark.parametrize("name,hidden,heads,kv,ffn,vocab,tp", [
    ("r1_distill_qwen_1p5b", 1536, 12, 2, 8960, 151936, 2),
    ("r1_distill_qwen_7b", 3584, 28, 4, 18944, 152064, 4),
])
def test_gpu_configs_load(name, hidden, heads, kv, ffn, vocab, tp):
    cfg = load_config(TrainConfig, REPO / "examples" / "configs" / f"{name}.yaml")
    m = cfg.model
    assert (m.arch, m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups) == \
        ("qwen2", hidden, 28, heads, kv)
    assert (m.ffn_hidden_size, m.vocab_size, m.rope_theta, m.tie_word_embeddings, m.qkv_bias) == \
        (ffn, vocab, 10000.0, False, True)
    assert cfg.parallel.tensor_model_parallel_size == tp and 8 % tp == 0
    assert m.num_query_groups % tp == 0 and m.num_attention_heads % tp == 0
    assert cfg.parallel.params_dtype == "bfloat16"
    assert (cfg.loss.name, cfg.loss.dgpo_n, cfg.loss.dgpo_m) == ("dgpo", 1.0, 2.0)
    assert (cfg.loss.aggregation, cfg.loss.eps_low, cfg.loss.eps_high) == ("token-mean", 0.2, 0.2)
    assert cfg.optim.lr == 1e-6 and cfg.algo.mini_batches > 1
    assert cfg.reward.kind == "math"
    assert (cfg.rollout.engine, cfg.rollout.sglang.mode) == ("sglang", "server")
    assert "CHANGE_ME" in cfg.warmstart.init_hf_path and "CHANGE_ME" in cfg.data.train.path
    assert "CHANGE_ME" in cfg.data.tokenizer
    # the launcher's disaggregated overrides apply cleanly on top
    serve = SGLangServeSpec(nodes=1, servers_per_node=8 // cfg.rollout.sglang.tp_size)
    spec.validate(str(REPO / "examples" / "configs" / f"{name}.yaml"), [], serve, 8)


@pytest.mark.parametrize("name,arch,layers,heads,kv,head_dim,tp,extra", [
    ("qwen3_4b", "qwen3", 36, 32, 8, 128, 2, dict(tie_word_embeddings=True, rope_scaling=None)),
    ("llama31_8b", "llama", 32, 32, 8, 128, 4, dict(
        tie_word_embeddings=False, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=8192))),
])
def test_qwen3_and_llama3_configs_validate(name, arch, layers, heads, kv, head_dim, tp, extra):
    """Issue 14's example configs: the model fields Megatron needs, a layout the launcher's checks accept
    on one 8-GPU node (the trainer's own checks run on load), and the HF config.json they imply."""
    from megatron_dgpo.launch.layout_check import check_layout
    from megatron_dgpo.weight_sync.layouts import get_layout

    cfg = load_config(TrainConfig, REPO / "examples" / "configs" / f"{name}.yaml")
    m = cfg.model
    assert (m.arch, m.num_layers, m.num_attention_heads, m.num_query_groups, m.head_dim) == \
        (arch, layers, heads, kv, head_dim)
    assert not m.qkv_bias and m.qk_layernorm == (arch == "qwen3") and get_layout(m)
    for k, v in extra.items():
        assert getattr(m, k) == v, k
    assert cfg.parallel.tensor_model_parallel_size == tp and cfg.parallel.params_dtype == "bfloat16"
    check_layout(cfg, nodes=1, gpus_per_node=8)
    hf = m.to_hf_config()
    assert hf["head_dim"] == head_dim and (hf.get("rope_scaling") or {}).get("rope_type") == \
        ("llama3" if extra["rope_scaling"] else None)
    serve = SGLangServeSpec(nodes=1, servers_per_node=8 // cfg.rollout.sglang.tp_size)
    spec.validate(str(REPO / "examples" / "configs" / f"{name}.yaml"), [], serve, 8)


# ---------------------------------------------------------------- spec (no nemo-run)
def test_validate_rejects_bad_override_before_submission():
    with pytest.raises(ConfigError, match="algo.stepz"):
        spec.validate(EMBEDDED, ["algo.stepz=1"])
    with pytest.raises(ConfigError):
        spec.validate(EMBEDDED, ["rollout.group_size=1"])  # __post_init__ check
    with pytest.raises(ValueError, match="needs a model"):
        spec.validate(EMBEDDED, [], SGLangServeSpec(nodes=1), 8)
    gpu = str(REPO / "examples" / "configs" / "r1_distill_qwen_1p5b.yaml")
    with pytest.raises(ValueError, match="server_urls"):  # server mode, no servers given or started
        spec.validate(gpu, [])
    with pytest.raises(ValueError, match="CHANGE_ME"):
        spec.validate(gpu, [], SGLangServeSpec(nodes=1), 8, check_paths=True)
    paths = ["warmstart.init_hf_path=/m", "data.tokenizer=/m", "data.train.path=/t.parquet",
             "data.eval.path=/e.parquet"]
    spec.validate(gpu, paths, SGLangServeSpec(nodes=1), 8, check_paths=True)
    spec.validate(gpu, paths + ["rollout.sglang.server_urls=[http://h:30000]"], check_paths=True)


def test_cli_config_error_exit_code_2(capsys):
    assert _cli().main(["local", "--config", EMBEDDED, "algo.stepz=1"]) == 2
    assert "algo.stepz" in capsys.readouterr().err


def test_disaggregated_shell_snippets_are_valid_bash():
    serve = SGLangServeSpec(nodes=2, servers_per_node=2, extra_args=["--mem-fraction-static", "0.8"])
    assert serve.num_servers == 4 and serve.tp_size(8) == 4 and serve.use_router()
    assert not SGLangServeSpec(nodes=1).use_router()
    with pytest.raises(ValueError):
        SGLangServeSpec(servers_per_node=3).tp_size(8)
    texts = [spec.sglang_setup_lines(serve), spec.sglang_server_script(serve, "/m/qwen", 8),
             spec.torchrun_inline(2, 8, spec.WAIT_SCRIPT, ["--config", "a b.yaml", "x=[1,2]"], 29500)]
    for text in texts:
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert "--tp-size 4" in texts[1] and "sglang_router.launch_router" in texts[1]
    assert "'a b.yaml'" in texts[2] and "--nnodes 2 --nproc-per-node 8" in texts[2]
    # the setup lines expand to the URLs the trainer receives
    out = subprocess.run(["bash", "-c", texts[0].replace(
        "$(scontrol show hostnames \"$SLURM_JOB_NODELIST_HET_GROUP_1\")", "n1 n2").replace(
        "$(scontrol show hostnames \"$SLURM_JOB_NODELIST_HET_GROUP_0\" | head -n1)", "t0")
        + "\necho \"URLS=$DGPO_SGLANG_URLS\""], capture_output=True, text=True, check=True).stdout
    assert "URLS=http://n1:30000,http://n1:30001,http://n2:30000,http://n2:30001" in out


def test_wait_then_train_overrides_and_health(monkeypatch):
    env = {"DGPO_SGLANG_URLS": "http://a:30000,http://b:30001", "DGPO_TRAIN_MASTER": "node7"}
    over = wtt.extra_overrides(env)
    cfg = spec.load_train_config(EMBEDDED, over + ["rollout.engine=sglang"])
    assert cfg.rollout.sglang.server_urls == ["http://a:30000", "http://b:30001"]
    # the weight-broadcast master is trainer rank 0's own host, not the job's first node
    assert not any("nccl_master_address" in o for o in over)
    assert cfg.rollout.sglang.nccl_master_address == ""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        up = f"http://127.0.0.1:{srv.server_address[1]}"
        assert wtt.wait_for([up], timeout_s=5, poll_s=0.1) == []
        assert wtt.wait_for(["http://127.0.0.1:9"], timeout_s=0.2, poll_s=0.1) == ["http://127.0.0.1:9"]
    finally:
        srv.shutdown()
    monkeypatch.setenv("DGPO_SGLANG_URLS", "http://127.0.0.1:9")
    assert wtt.main(["--timeout", "0.1", "--", "--config", EMBEDDED]) == 2


# ---------------------------------------------------------------- nemo-run
@pytest.fixture
def nemo(monkeypatch):
    pytest.importorskip("nemo_run")
    from megatron_dgpo.launch import nemo as nemo_mod

    # nemo-run runs shell commands through `invoke`, which reads stdin; pytest's captured stdin raises.
    devnull = open(os.devnull)
    monkeypatch.setattr(sys, "stdin", devnull)
    yield nemo_mod
    devnull.close()


def _slurm(**kw):
    base = dict(account="my_acct", partition="batch", nodes=2, gpus_per_node=8, time="04:00:00",
                container_image="nvcr.io/example/megatron-dgpo:0.1.0", container_mounts=["/lustre:/lustre"],
                env_vars={"NCCL_SOCKET_IFNAME": "ib0"}, job_dir="/tmp/nemo_run_jobs", packager="none")
    base.update(kw)
    return SlurmSpec(**base)


def test_slurm_dryrun_two_nodes_eight_gpus(nemo, tmp_path):
    plan = nemo.plan_slurm(EMBEDDED, ["algo.steps=1"], _slurm())
    files = nemo.dryrun(plan, base_dir=str(tmp_path))
    (name, sbatch), = [(k, v) for k, v in files.items() if k.endswith("_sbatch.sh")]
    for line in ["#SBATCH --account=my_acct", "#SBATCH --partition=batch", "#SBATCH --nodes=2",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --time=04:00:00", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --exclusive"]:
        assert line in sbatch.splitlines(), line
    assert "--container-image nvcr.io/example/megatron-dgpo:0.1.0" in sbatch
    assert "--container-mounts /lustre:/lustre" in sbatch
    assert "export NCCL_SOCKET_IFNAME=ib0" in sbatch
    (cmd,) = [ln for ln in sbatch.splitlines() if ln.startswith("srun") and "torchrun" in ln]
    torchrun = cmd[cmd.index("torchrun"):]
    for part in ["--nnodes 2", "--nproc-per-node 8", "--node-rank $SLURM_NODEID", "--rdzv-backend c10d",
                 "--rdzv-endpoint $head_node_ip:29500",
                 "/opt/megatron_dgpo/examples/train_dgpo.py --config /opt/megatron_dgpo/examples/configs/"
                 "embedded_cpu.yaml algo.steps=1"]:
        assert part in torchrun, part
    assert not list(tmp_path.rglob("*_sbatch.sh")), "dry run must not leave files behind"

    # disaggregated SGLang: one heterogeneous job, trainer group 0, servers group 1
    serve = SGLangServeSpec(nodes=1, servers_per_node=2, model_path="/lustre/hf/R1-Distill-Qwen-1.5B",
                            container_image="lmsys/sglang-image:tag")
    files = nemo.dryrun(nemo.plan_slurm(EMBEDDED, ["algo.steps=1"], _slurm(), serve), base_dir=str(tmp_path))
    sbatch = next(v for k, v in files.items() if k.endswith("_sbatch.sh"))
    scripts = [v for k, v in files.items() if not k.endswith("_sbatch.sh")]
    assert "#SBATCH hetjob" in sbatch and sbatch.count("#SBATCH --nodes=") == 2
    (g0,) = [ln for ln in sbatch.splitlines() if ln.startswith("srun --het-group=0")]
    (g1,) = [ln for ln in sbatch.splitlines() if ln.startswith("srun --het-group=1")]
    assert "--container-image nvcr.io/example/megatron-dgpo:0.1.0" in g0
    assert "--container-image lmsys/sglang-image:tag" in g1
    assert "export DGPO_SGLANG_URLS=" in sbatch and "DGPO_SGLANG_ROUTER" in sbatch
    train = next(s for s in scripts if "torchrun" in s)
    server = next(s for s in scripts if "sglang.launch_server" in s)
    assert "--nnodes 2 --nproc-per-node 8" in train and "wait_then_train.py" in train
    assert "rollout.engine=sglang" in train and "rollout.sglang.mode=server" in train
    assert "rollout.sglang.tp_size=4" in train
    assert "--tp-size 4" in server and "/lustre/hf/R1-Distill-Qwen-1.5B" in server
    assert "sglang_router.launch_router" in server


@pytest.mark.slow
@pytest.mark.dist
def test_local_executor_success_and_failure(nemo, tmp_path):
    """One experiment, two torchrun jobs of 2 CPU processes: a tiny embedded run that completes
    and one whose override is valid config but fails at run time (a missing data file)."""
    tiny = ["algo.steps=1", "warmstart.sft_steps=2", "eval.num_prompts=4",
            f"warmstart.cache_dir={tmp_path / 'cache'}"]
    good = nemo.plan_local(EMBEDDED, tiny + [f"output_dir={tmp_path / 'good'}"], nproc_per_node=2)
    bad = nemo.plan_local(EMBEDDED, tiny + [f"output_dir={tmp_path / 'bad'}", "data.task=file",
                                            f"data.train.path={tmp_path / 'missing.jsonl'}"], nproc_per_node=2)
    plan = nemo.LaunchPlan("dgpo-test", good.tasks + bad.tasks, good.executors + bad.executors, ["good", "bad"])
    code, states = nemo.submit(plan, base_dir=str(tmp_path / "nemo"))
    assert states == {"good": ["SUCCEEDED"], "bad": ["FAILED"]}, states
    assert code == 1
    assert (tmp_path / "good" / "summary.json").is_file()
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_secrets_never_in_the_batch_script(nemo, tmp_path, monkeypatch):
    """--env values named like secrets are not written into the sbatch script (they travel in
    sbatch's environment; the script only checks they arrived) and are masked in dry-run output;
    the servers get a per-job API key made on the allocation and, with deterministic rollouts,
    --enable-deterministic-inference."""
    monkeypatch.setenv("HF_TOKEN", "")  # restored after the test (plan_slurm sets it)
    monkeypatch.setenv("WANDB_API_KEY", "")
    slurm = _slurm()
    slurm.env_vars.update({"HF_TOKEN": "hf_verysecret123", "WANDB_API_KEY": "wandbsecret456"})
    serve = SGLangServeSpec(nodes=1, servers_per_node=2, model_path="/m")
    files = nemo.dryrun(nemo.plan_slurm(EMBEDDED, ["algo.steps=1", "rollout.sglang.deterministic=true"], slurm,
                                        serve), base_dir=str(tmp_path))
    text = "\n".join(files.values())
    assert "hf_verysecret123" not in text and "wandbsecret456" not in text
    assert ': "${HF_TOKEN:?' in text and ': "${WANDB_API_KEY:?' in text
    assert "export NCCL_SOCKET_IFNAME=ib0" in text  # ordinary variables still are written
    assert os.environ["HF_TOKEN"] == "hf_verysecret123"  # handed to sbatch through its environment
    server = next(v for k, v in files.items() if "sglang.launch_server" in v)
    assert '--api-key "$DGPO_SGLANG_API_KEY"' in server and "--enable-deterministic-inference" in server
    assert "secrets.token_urlsafe" in next(v for k, v in files.items() if k.endswith("_sbatch.sh"))
    assert spec.mask_secrets("token=abc123 x", {"MY_TOKEN": "abc123", "PLAIN": "x"}) == "token=*** x"


def test_slurm_plan_refuses_a_layout_that_cannot_fit(nemo):
    """TP2 x PP7 (valid for the model) on 2 nodes x 8 GPUs renders no job: refused before
    submission, naming the keys."""
    gpu = str(REPO / "examples" / "configs" / "r1_distill_qwen_1p5b.yaml")
    over = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=7"]
    with pytest.raises(ValueError, match="= 14 does not divide the 16 trainer GPUs"):
        nemo.plan_slurm(gpu, over, _slurm(), check_paths=False)
