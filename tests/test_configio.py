from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from megatron_dgpo.configio import (ConfigError, config_to_dict, format_config, from_dict,
                                    load_config, parse_overrides, to_yaml)
from megatron_dgpo.model.config import ModelConfig


@dataclass
class LossCfg:
    kind: Literal["dgpo", "grpo"] = "dgpo"
    clip: float = 0.2

    def __post_init__(self):
        if self.clip <= 0:
            raise ValueError("clip must be positive")


@dataclass
class Top:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossCfg = field(default_factory=LossCfg)
    lr: float = 1e-6
    steps: int = 10
    use_kl: bool = False
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    dims: tuple[int, int] = (1, 2)
    sub: Optional[LossCfg] = None
    out: Path = Path("out")


def write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_and_yaml_and_overrides(tmp_path):
    p = write(tmp_path, {"model": {"hidden_size": 32, "num_attention_heads": 4}, "lr": 3e-4,
                         "loss": {"kind": "grpo"}})
    cfg = load_config(Top, p, ["steps=5", "model.num_layers=3", "name=run1", "tags=[a, b]",
                               "lr=1e-5", "sub.clip=0.3", "use_kl=true", "dims=[3,4]"])
    assert cfg.model.hidden_size == 32 and cfg.model.num_layers == 3
    assert cfg.model.vocab_size == ModelConfig().vocab_size
    assert cfg.loss.kind == "grpo" and cfg.loss.clip == 0.2
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)
    assert cfg.steps == 5 and cfg.name == "run1" and cfg.tags == ["a", "b"]
    assert cfg.use_kl is True and cfg.dims == (3, 4)
    assert isinstance(cfg.sub, LossCfg) and cfg.sub.clip == 0.3
    assert cfg.out == Path("out")


def test_float_from_int_and_exponent_without_dot():
    assert from_dict(Top, {"lr": 1}).lr == 1.0
    # yaml.safe_load("1e-6") is the string "1e-6"
    assert load_config(Top, None, ["lr=1e-6"]).lr == 1e-6


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, {"model": {"hiden_size": 32}})
    with pytest.raises(ConfigError) as e:
        load_config(Top, p)
    assert "model.hiden_size" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ConfigError, match="loss.klip.*command-line"):
        load_config(Top, None, ["loss.klip=1"])


@pytest.mark.parametrize("ov,frag", [
    ("steps=1.5", "steps"), ("steps=abc", "steps"), ("use_kl=1", "use_kl"),
    ("loss.kind=ppo", "loss.kind"), ("tags=abc", "tags"), ("dims=[1]", "dims"),
    ("lr=[1]", "lr"), ("model=3", "model"),
])
def test_type_errors(ov, frag):
    with pytest.raises(ConfigError, match=frag.replace(".", r"\.")):
        load_config(Top, None, [ov])


def test_post_init_validation_surfaces():
    with pytest.raises(ConfigError, match="clip must be positive"):
        load_config(Top, None, ["loss.clip=-1"])
    with pytest.raises(ConfigError, match="arch"):
        load_config(Top, None, ["model.arch=gpt2"])


def test_train_config_checkpoint_format():
    from megatron_dgpo.config import TrainConfig

    assert load_config(TrainConfig, None, ["optimizer_checkpoint_format=dp_reshardable"]).optimizer_checkpoint_format \
        == "dp_reshardable"
    with pytest.raises(ConfigError, match="optimizer_checkpoint_format"):
        load_config(TrainConfig, None, ["optimizer_checkpoint_format=torch_dist"])


def test_optional_none_and_bad_override_syntax():
    cfg = load_config(Top, None, ["name=null", "sub=null"])
    assert cfg.name is None and cfg.sub is None
    with pytest.raises(ConfigError):
        parse_overrides(["noequals"])
    with pytest.raises(ConfigError):
        parse_overrides(["a..b=1"])


def test_roundtrip_yaml(tmp_path):
    cfg = load_config(Top, None, ["model.arch=llama", "model.qkv_bias=false", "tags=[x]", "sub.kind=grpo"])
    text = to_yaml(cfg)
    p = tmp_path / "rt.yaml"
    p.write_text(text)
    again = load_config(Top, p)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    s = format_config(cfg)
    assert "model.arch" in s and "'llama'" in s


def test_empty_yaml_and_non_mapping(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("")
    assert load_config(Top, p) == Top()
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Top, p)
