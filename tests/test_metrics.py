"""metrics.jsonl rows (rl/metrics.py): integer steps, every documented key on every train row."""
import json
import math

from megatron_dgpo.rl.metrics import REQUIRED, STAGE_TIMES, TRAIN_KEYS, MetricsLogger, complete_row, read_metrics


def test_step_is_an_integer_and_skipped_rows_have_every_key(tmp_path):
    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False)
    skipped = complete_row({"step": 3, "kind": "train", "reward_mean": 0.0, "rollout_s": 0.2, "reward_s": 0.1,
                            "sync_s": 0.01, "step_s": 0.4, "rollout_tokens": 100,
                            "skipped": "no group with reward variance"})
    log.log(skipped)
    log.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert '"step": 3,' in text  # not 3.0
    (row,) = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert isinstance(row["step"], int)
    assert set(REQUIRED) <= set(TRAIN_KEYS) and set(TRAIN_KEYS) <= set(row)
    assert math.isnan(row["loss"]) and math.isnan(row["update_tokens_per_s"])
    assert row["old_logp_s"] == 0.0 and row["update_s"] == 0.0 and set(STAGE_TIMES) <= set(row)
    assert row["reward_mean"] == 0.0 and row["rollout_s"] == 0.2  # measured values are kept
    json.loads(text)  # NaN is written as Python's json reads it
