"""Fixtures of the engine tests: the uninterrupted 2-process ZeRO runs several DeepSpeed tests compare against.

A torchrun of 2 ranks costs ~15 s on 2 idle cores (almost all of it interpreter start-up and imports: torch,
transformers, deepspeed), so each stage's reference run is trained once per session and shared: test_deepspeed.py
compares it with one process, test_deepspeed_checkpoints.py with a killed-and-resumed run of the same recipe.
Both modules are in the xdist group "deepspeed", so under `make test` they run in the same worker."""
from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ds_config, free_port, make_quickstart_data, torchrun_train, zero_recipe_raw


@pytest.fixture(scope="session")
def zero_data(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("ds-data"), n_train=48, n_eval=8)


@pytest.fixture(scope="session")
def zero_run(zero_data, tmp_path_factory) -> Callable[[str], Path]:
    """stage -> the output dir of an uninterrupted 2-process run of ``zero_recipe_raw(grad_accum=1)`` under that
    ZeRO stage (global batch 2 ranks x micro-batch 2), trained on first use."""
    runs: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"zero-run-{stage}")
            out = tmp / "out"
            recipe = tmp / "recipe.yaml"
            recipe.write_text(yaml.safe_dump(zero_recipe_raw(zero_data, out, grad_accum=1, deepspeed=ds_config(stage))))
            proc = torchrun_train(tmp, recipe)
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[stage] = out
        return runs[stage]

    return get


@pytest.fixture
def store_pair():
    """A rendezvous store served in this process and one client connection per rank (as every rank has)."""
    port = free_port()
    server = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=10),
                                        wait_for_workers=False)
    clients = [torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10),
                                          wait_for_workers=False) for _ in range(2)]
    yield clients
    del clients, server
