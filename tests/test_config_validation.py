"""Configuration errors are found at load, in one bounded line naming the key and the file, with
exit code 2 (issue 11, item 4); the launcher's layout check; HF import compares every field that
changes the math and refuses non-finite or integer weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dgpo.config import TrainConfig
from megatron_dgpo.configio import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "examples" / "configs" / "embedded_cpu.yaml")

BAD = ["algo.mini_batches=0", "algo.epochs=0", "optim.clip_grad=nan", "optim.lr=inf", "optim.lr=-1",
       "rollout.temperature=nan", "rollout.top_p=2", "rollout.max_new_tokens=0", "eval.num_prompts=0",
       "warmstart.sft_steps=-5", "reward.timeout_s=nan", "reward.timeout_s=inf", "loss.dgpo_n=nan",
       "loss.dgpo_m=nan", "loss.ce_beta1=nan", "loss.ce_beta2=.nan", "algo.micro_batch_size=0",
       "rollout.top_k=0", "optim.adam_beta2=1.0", "parallel.tensor_model_parallel_size=3",
       "algo.max_skipped_steps=0", "algo.mini_batches=1000", "algo.old_logp_source=foo",
       "parallel.num_layers_in_first_pipeline_stage=1", "parallel.num_layers_in_last_pipeline_stage=0"]


@pytest.mark.parametrize("override", BAD)
def test_bad_values_refused_at_load_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, CONFIG, [override])
    msg = str(info.value)
    assert key in msg and CONFIG in msg and "\n" not in msg, msg


def test_defaults_and_examples_load():
    TrainConfig()
    for name in os.listdir(REPO / "examples" / "configs"):
        load_config(TrainConfig, str(REPO / "examples" / "configs" / name))


def test_alias_bomb_gives_a_short_message(tmp_path):
    # 9**6 strings once expanded (a few MB when printed; the 9**9 gave 580 MB), as the
    # value of a known key, anchors defined inside it
    levels = ["&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"] + [
        f"&{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcde", "bcdef")]
    path = tmp_path / "bomb.yaml"
    path.write_text("data:\n  tokenizer: [" + ", ".join(levels) + "]\n")
    assert len(path.read_bytes()) < 500
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, str(path))
    assert len(str(info.value)) < 1000 and "data.tokenizer" in str(info.value), len(str(info.value))


def _run_main(args, world=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if world:
        env.update(WORLD_SIZE=str(world), RANK="1")
    return subprocess.run([sys.executable, str(REPO / "examples" / "train_dgpo.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_entry_point_one_line_exit_2(tmp_path):
    p = _run_main(["--config", CONFIG, "algo.mini_batches=0", f"output_dir={tmp_path}/o"])
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "algo.mini_batches" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "o").exists()  # before anything is built or written
    p = _run_main(["--config", str(tmp_path / "missing.yaml")])
    assert p.returncode == 2 and "missing.yaml" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    p = _run_main(["--config", CONFIG, "parallel.tensor_model_parallel_size=2"], world=3)  # TP=2 on 3 processes; rank 1 prints nothing
    assert p.returncode == 2 and p.stderr == "", p.stderr[-2000:]


def test_launcher_layout_check():
    from megatron_dgpo.launch.layout_check import check_layout

    cfg = load_config(TrainConfig, str(REPO / "examples" / "configs" / "r1_distill_qwen_1p5b.yaml"))
    check_layout(cfg, nodes=2, gpus_per_node=8)
    cfg.parallel.tensor_model_parallel_size = 3  # 16 GPUs, 12 heads, 2 KV heads
    with pytest.raises(ValueError, match="does not divide the 16 trainer GPUs"):
        check_layout(cfg, nodes=2, gpus_per_node=8)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = 4, 1
    check_layout(cfg, nodes=2, gpus_per_node=8)  # 2 KV heads at TP 4: Megatron-Core replicates them
    cfg.parallel.tensor_model_parallel_size = 8  # 12 heads
    with pytest.raises(ValueError, match="must divide model.num_attention_heads=12"):
        check_layout(cfg, nodes=2, gpus_per_node=8)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = 1, 8  # 28 layers
    with pytest.raises(ValueError, match="must divide model.num_layers=28, or set parallel.num_layers_in_first"):
        check_layout(cfg, nodes=2, gpus_per_node=8)
    cfg.parallel.num_layers_in_first_pipeline_stage = 7  # 7 + 7 x 3
    check_layout(cfg, nodes=2, gpus_per_node=8)
    cfg.parallel.num_layers_in_last_pipeline_stage = 4  # 28 - 11 = 17 over 6 stages
    with pytest.raises(ValueError, match="leaves 17 layers for 6 other stage"):
        check_layout(cfg, nodes=2, gpus_per_node=8)


@pytest.mark.parametrize("layers,pp,first,last,want", [
    (28, 4, None, None, [7, 7, 7, 7]), (28, 3, 10, None, [10, 9, 9]), (28, 3, None, 8, [10, 10, 8]),
    (3, 2, 1, None, [1, 2]), (3, 2, None, 1, [2, 1]), (5, 3, 1, 2, [1, 2, 2]), (4, 2, 2, 2, [2, 2]),
])
def test_pipeline_stage_layers_matches_megatron(layers, pp, first, last, want):
    """Our pre-build check agrees with Megatron-Core's own split (get_num_layers_to_build)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dgpo.config_checks import pipeline_stage_layers

    assert pipeline_stage_layers(layers, pp, first, last) == want
    tc = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=2, pipeline_model_parallel_size=pp,
                           num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                           pipeline_dtype=__import__("torch").float32)
    assert [get_num_layers_to_build(tc, pp_rank=r) for r in range(pp)] == want


@pytest.mark.parametrize("layers,pp,first,last,match", [
    (28, 3, None, None, "must divide model.num_layers=28"), (3, 2, 2, 2, "leaves -1 layers"),
    (7, 4, 1, 1, "leaves 5 layers for 2 other"), (4, 3, 2, 2, "leaves 0 layers for 1 other"),
    (3, 1, 1, None, "need parallel.pipeline_model_parallel_size >= 2"), (3, 2, 0, None, "must be >= 1"),
])
def test_pipeline_stage_layers_refuses(layers, pp, first, last, match):
    from megatron_dgpo.config_checks import pipeline_stage_layers

    with pytest.raises(ValueError, match=match):
        pipeline_stage_layers(layers, pp, first, last)


# ----------------------------------------------------------------------------- HF import
def _hf_folder(tmp_path, cfg, mutate_config=None, mutate_state=None):
    import torch
    from safetensors.torch import save_file

    from megatron_dgpo.weight_sync import megatron_state_from_hf  # noqa: F401 (import check)
    from megatron_dgpo.weight_sync.layouts import hf_shapes, iter_rule_instances

    d = tmp_path / "hf"
    d.mkdir()
    hf = cfg.to_hf_config()
    if mutate_config:
        hf.update(mutate_config)
    (d / "config.json").write_text(json.dumps(hf))
    state = {}
    for layer, rule in iter_rule_instances(cfg):
        for name, shape in zip(rule.hf_names(layer), hf_shapes(cfg, rule)):
            state[name] = torch.randn(*shape) * 0.02
    if mutate_state:
        mutate_state(state)
    save_file(state, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("field,value", [("rope_theta", 1e6), ("rms_norm_eps", 1e-5),
                                         ("max_position_embeddings", 1024)])
def test_hf_import_compares_math_fields(tmp_path, field, value):
    from megatron_dgpo.model.config import ModelConfig
    from megatron_dgpo.weight_sync.hf_io import CheckpointError
    from megatron_dgpo.weight_sync.load import load_hf_into_megatron

    cfg = ModelConfig()
    d = _hf_folder(tmp_path, cfg, mutate_config={field: value})
    with pytest.raises(CheckpointError, match=field):
        load_hf_into_megatron([], str(d), cfg)


@pytest.mark.parametrize("kind", ["nan", "inf", "int"])
def test_hf_import_refuses_nonfinite_or_integer_weights(tmp_path, kind):
    import torch

    from megatron_dgpo.model.config import ModelConfig
    from megatron_dgpo.weight_sync import megatron_state_from_hf
    from megatron_dgpo.weight_sync.hf_io import CheckpointError

    victim = "model.layers.1.mlp.up_proj.weight"

    def mutate(state):
        if kind == "int":
            state[victim] = torch.ones_like(state[victim], dtype=torch.int32)
        else:
            state[victim][3, 5] = float(kind)

    d = _hf_folder(tmp_path, ModelConfig(), mutate_state=mutate)
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        megatron_state_from_hf(str(d))
