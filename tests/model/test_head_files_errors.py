"""peftlab.model.head_files refuses head files it cannot use with one message naming the file, the adapter
directory, what the files hold and the fix: a file missing (a partial copy of the adapter directory), a config
that is not JSON or lacks a key, weights of another shape (files that do not belong together)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.model.domain_head import (
    DOMAIN_CONFIG_FILE,
    DOMAIN_HEAD_FILE,
    attach_domain_head,
    load_domain_head,
    save_domain_head,
)

CPU = torch.device("cpu")


def _saved(tmp_path, width: int = 8):
    model = nn.Sequential(nn.Linear(4, 4))
    attach_domain_head(model, 4, width, lr=None)
    save_domain_head(model, tmp_path)
    return tmp_path


@pytest.mark.parametrize("missing", [DOMAIN_HEAD_FILE, DOMAIN_CONFIG_FILE])
def test_a_missing_domain_head_file_names_the_file_the_dir_and_the_fix(tmp_path, missing):
    d = _saved(tmp_path)
    (d / missing).unlink()
    with pytest.raises(PeftlabError) as err:
        load_domain_head(nn.Sequential(nn.Linear(4, 4)), d, CPU)
    message = str(err.value)
    assert message.startswith(f"{d / missing}: no such file; the adapter directory {d} is incomplete")
    assert f"not the DANN domain head, which is saved beside it as {DOMAIN_CONFIG_FILE} + {DOMAIN_HEAD_FILE}" in message
    assert "Point at the adapter/ or best/ directory the run wrote" in message


def test_damaged_or_mismatched_head_files_are_refused(tmp_path):
    d = _saved(tmp_path)
    config = json.loads((d / DOMAIN_CONFIG_FILE).read_text())
    cases = {
        "not json": "{",                                           # a truncated write of another tool
        "a key missing": json.dumps({"hidden_size": 4}),           # KeyError: width
        "another width": json.dumps({**config, "width": 16}),      # weights of another shape
    }
    for why, text in cases.items():
        (d / DOMAIN_CONFIG_FILE).write_text(text)
        model = nn.Sequential(nn.Linear(4, 4))
        with pytest.raises(PeftlabError, match=rf"^{d}: the DANN domain head files {DOMAIN_CONFIG_FILE} \+ "
                                               rf"{DOMAIN_HEAD_FILE} do not load \(\w+Error: .*\); they are damaged"):
            load_domain_head(model, d, CPU)
        assert not hasattr(model, "peftlab_domain_head"), why  # nothing half-registered
    (d / DOMAIN_CONFIG_FILE).write_text(json.dumps(config))
    (d / DOMAIN_HEAD_FILE).write_bytes(b"not safetensors")
    with pytest.raises(PeftlabError, match=r"do not load \(SafetensorError: "):
        load_domain_head(nn.Sequential(nn.Linear(4, 4)), d, CPU)
