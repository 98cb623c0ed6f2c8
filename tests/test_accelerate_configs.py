"""The shipped accelerate configs are valid for accelerate and start with the command that uses them."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from .conftest import ROOT

CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_accelerate_config_loads_and_documents_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file configs/accelerate/" + path.name)
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1


def test_the_four_strategies_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
