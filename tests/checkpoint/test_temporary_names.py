"""One owner of the atomic write's temporary-name format (peftlab/checkpoint/atomic.py): ``target_of_temporary``
inverts ``temporary_name`` and what ``atomic_write`` really writes to, and says None for every other name; the
refused-write message of a run (peftlab/trainer/failures.py) names the target through it."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from peftlab.checkpoint.atomic import atomic_write, target_of_temporary, temporary_name
from peftlab.trainer.failures import output_write_error


@pytest.mark.parametrize("name", ["metrics.jsonl", "adapter_model.safetensors", ".hidden", "a.tmp-3", "x",
                                  "model.Q4_K_M.gguf", "with space.json"])
def test_a_temporary_name_leads_back_to_its_target(tmp_path, name):
    target = tmp_path / "sub" / name
    tmp = temporary_name(target)
    assert tmp.parent == target.parent and tmp.name != name
    assert target_of_temporary(tmp) == target


def test_the_temporary_an_atomic_write_really_uses_leads_back_to_its_target(tmp_path):
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("x")
    atomic_write(tmp_path / "loss.png", write)
    assert len(seen) == 1 and target_of_temporary(seen[0]) == tmp_path / "loss.png"


@pytest.mark.parametrize("name", ["metrics.jsonl", ".metrics.jsonl", "metrics.jsonl.tmp-12", ".metrics.jsonl.tmp-",
                                  ".metrics.jsonl.tmp-12x", ".tmp-12", "..tmp-12", ".step-0000004.tmp-k3j9x1"])
def test_any_other_name_has_no_target(tmp_path, name):
    assert target_of_temporary(tmp_path / name) is None


def test_a_refused_write_names_the_file_being_replaced(tmp_path):
    tmp = temporary_name(tmp_path / "metrics.jsonl")
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    assert output_write_error(exc, tmp_path)[0] == str(tmp_path / "metrics.jsonl")
    other = tmp_path / ".metrics.jsonl.tmp-12x"
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(other))
    assert output_write_error(exc, tmp_path)[0] == str(other)
