from __future__ import annotations

import pytest

from mcserve.server.engine.config import EngineConfig
from mcserve.server.errors import ConfigError


def test_defaults_are_valid() -> None:
    cfg = EngineConfig()
    assert cfg.snapshots and cfg.num_state_slots >= cfg.max_num_seqs


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1, got 0"),
    ({"segment_size": 2.5}, "got 2.5"),
    ({"num_checkpoint_blocks": 1}, "got 1"),
    ({"num_host_blocks": -3}, "got -3"),
    ({"max_num_seqs": 8, "num_state_slots": 5}, "num_state_slots (5) must be >= max_num_seqs (8)"),
    ({"max_num_batched_tokens": 100, "segment_size": 128}, "max_num_batched_tokens (100)"),
    ({"max_num_batched_tokens": 100, "max_num_seqs": 101, "num_state_slots": 101}, "max_num_seqs 101"),
    ({"utility_decay": 0.0}, "utility_decay must be in (0, 1], got 0.0"),
    ({"utility_decay": float("nan")}, "got nan"),
    ({"evict_running_checkpoints": False, "max_model_len": 4096, "segment_size": 64,
      "num_checkpoint_blocks": 63}, "num_checkpoint_blocks (63)"),
    ({"enable_prefix_caching": 1}, "enable_prefix_caching must be a bool, got 1"),
])
def test_invalid_settings_name_the_bad_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        EngineConfig(**kwargs)
    assert needle in str(e.value)


def test_snapshots_need_prefix_caching() -> None:
    assert not EngineConfig(enable_prefix_caching=False).snapshots
    assert not EngineConfig(enable_snapshots=False).snapshots
