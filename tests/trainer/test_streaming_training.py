"""Training on ``data.streaming: true``: micro-batches in stream order, a new pass when the stream runs out, each
rank's share of a step, and an exact resume (the consumed micro-batches skipped) — plus what is refused before
anything loads (no ``train.max_steps``) and a resume onto changed source files."""
from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import make_quickstart_data, short_run_recipe

from peftlab.adapters.peft_format import lora_state_dict
from peftlab.data.build import DataBundle
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.stats import DataStats
from peftlab.data.tokenize import Encoder
from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer
from peftlab.trainer.setup import log_start
from peftlab.trainer.state import (
    EpochSampler,
    RunInputs,
    StreamSampler,
    TrainState,
    build_sampler,
    data_fingerprint,
)


class ListStream:
    """A stand-in stream: ``n`` examples per pass, tagged (pass, position), each pass in its own order."""

    def __init__(self, n: int):
        self.n, self.reads, self.known_rows = n, 0, [0]

    def iter_pass(self, epoch: int, skip: int = 0):
        self.reads += 1
        order = list(range(self.n)) if epoch % 2 == 0 else list(reversed(range(self.n)))
        return iter([{"id": (epoch, k)} for k in order][skip:])


def _ids(micro_batches) -> list[list[tuple[int, int]]]:
    return [[ex["id"] for ex in mb.examples] for mb in micro_batches]


def test_stream_sampler_order_passes_ranks_and_resume():
    stream, state = ListStream(10), TrainState()
    sampler = StreamSampler(stream, micro_batch_size=3)
    steps = [sampler.next_step(state, grad_accum=2) for _ in range(3)]
    assert _ids(steps[0]) == [[(0, 0), (0, 1), (0, 2)], [(0, 3), (0, 4), (0, 5)]]
    assert _ids(steps[1]) == [[(0, 6), (0, 7), (0, 8)], [(0, 9)]]  # a pass's last micro-batch may be short
    assert _ids(steps[2]) == [[(1, 9), (1, 8), (1, 7)], [(1, 6), (1, 5), (1, 4)]]  # the next pass, epoch 1
    assert [mb.epoch for mb in steps[2]] == [1, 1] and list(steps[2][1]) == [3, 4, 5]  # positions in the pass
    assert (state.epoch, state.micro_index) == (1, 2) and stream.reads == 2  # read on, not restarted, per step

    # resume: a new sampler at a recorded position reads the pass again and skips what was consumed
    for epoch, micro in [(0, 2), (0, 4), (1, 2)]:
        ref_state, fresh_state = TrainState(), TrainState(epoch=epoch, micro_index=micro)
        ref = StreamSampler(ListStream(10), 3)
        while (ref_state.epoch, ref_state.micro_index) != (epoch, micro):
            ref.next_step(ref_state, grad_accum=1)
        fresh = StreamSampler(ListStream(10), 3)
        for _ in range(4):
            assert _ids(fresh.next_step(fresh_state, 1)) == _ids(ref.next_step(ref_state, 1))
        assert (fresh_state.epoch, fresh_state.micro_index) == (ref_state.epoch, ref_state.micro_index)

    # two ranks: each takes every second micro-batch of the step one process with grad_accum x 2 trains
    one, r0, r1 = TrainState(), TrainState(), TrainState()
    s_one, s0, s1 = (StreamSampler(ListStream(10), 3) for _ in range(3))
    for _ in range(3):
        whole = _ids(s_one.next_step(one, grad_accum=4))
        assert _ids(s0.next_step(r0, 2, rank=0, world_size=2)) == whole[0::2]
        assert _ids(s1.next_step(r1, 2, rank=1, world_size=2)) == whole[1::2]
    assert (r0.epoch, r0.micro_index) == (r1.epoch, r1.micro_index) == (one.epoch, one.micro_index)

    with pytest.raises(PeftlabError, match="streamed training set is empty"):
        StreamSampler(ListStream(0), 3).next_step(TrainState(), 1)

    # the stream's learned row bounds travel in the state; a checkpoint written before they were kept has none
    stream, state = ListStream(10), TrainState(stream_rows=[4])
    StreamSampler(stream, 3).next_step(state, 1)
    assert stream.known_rows == state.stream_rows == [4]
    old = {k: v for k, v in TrainState(step=2).to_json().items() if k != "stream_rows"}
    assert TrainState.from_json(old).stream_rows == [] and TrainState.from_json(old).step == 2


class RowsWithStreamNames(list):
    """Rows in memory that happen to carry a stream's method names: still rows (one test, ``is_stream``)."""

    def iter_pass(self, epoch: int):
        return iter(self)

    def fingerprint(self) -> str:
        return "not a stream"


def _start_line(rows, caplog) -> str:
    recipe = SimpleNamespace(model=SimpleNamespace(name="m"), quantization=SimpleNamespace(mode="none"),
                             adapter=SimpleNamespace(r=2), train=SimpleNamespace(micro_batch_size=1, grad_accum=1))
    loaded = SimpleNamespace(model=torch.nn.Linear(2, 2), device=torch.device("meta"), dtype=torch.float32,
                             lora_modules=[])
    with caplog.at_level(logging.INFO, logger="peftlab.trainer.setup"):
        log_start(recipe, loaded, DataBundle(train=rows, eval=None, eval_prompts=[], stats=DataStats(max_seq_len=8),
                                           dataset_names=[]), 3, (1, ""))
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data: "))


def test_one_test_says_what_is_a_stream_sampler_fingerprint_count_and_start_line(stream_data, caplog):
    stream = build_data(DataConfig(train=["train.jsonl"], streaming=True), build_tokenizer(), seed=0,
                        base_dir=stream_data).train
    assert isinstance(build_sampler(stream, 2, 0), StreamSampler)
    assert data_fingerprint(stream) == stream.fingerprint() and stream.fingerprint().startswith("stream-")
    assert RunInputs.of(stream, None).n_train is None
    assert _start_line(stream, caplog).startswith("data: streamed train rows")

    caplog.clear()
    rows = RowsWithStreamNames([{"input_ids": [1, 2], "labels": [1, 2]}] * 3)
    assert isinstance(build_sampler(rows, 2, 0), EpochSampler)
    assert data_fingerprint(rows) == data_fingerprint(list(rows)) != "not a stream"
    assert RunInputs.of(rows, None).n_train == 3
    assert _start_line(rows, caplog).startswith("data: 3 train rows")


@pytest.fixture(scope="module")
def stream_data(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("stream-data"), n_train=22, n_eval=2)


def _recipe(data: Path, out: Path, **sections) -> dict:
    """7 steps of 4 streamed rows; eval rows held out of the stream (eval_split, materialised); no periodic saves."""
    raw = short_run_recipe(data, out, train={"max_steps": 7, "save_every": None, **sections.pop("train", {})},
                           **sections)
    raw["data"].update(streaming=True, shuffle_buffer=8, eval=[], eval_split=0.2)
    return raw


def _stop_after(trainer: Trainer, step: int) -> None:
    """A SIGTERM as the run's handler records it, once ``step`` is done: the loop checkpoints there and stops."""
    run_step = trainer.train_step

    def train_step():
        figures = run_step()
        if trainer.state.step == step:
            trainer.preemption.signal = signal.SIGTERM
        return figures
    trainer.train_step = train_step


def test_streaming_run_stopped_and_resumed_equals_uninterrupted(stream_data, tmp_path, monkeypatch):
    encoded = []  # records tokenized
    encode_batch = Encoder.encode_batch
    monkeypatch.setattr(Encoder, "encode_batch", lambda self, records: encoded.extend(records) or encode_batch(
        self, records))
    ref = Trainer(recipe_from_dict(_recipe(stream_data, tmp_path / "ref")), quiet=True)
    encoded.clear()
    done = ref.train()
    ref_encoded = len(encoded)
    assert len(done.losses) == 7 and all(torch.isfinite(torch.tensor(done.losses)))
    assert ref.inputs.n_train is None and ref.inputs.data_fingerprint.startswith("stream-")
    # 22 rows less those held out: fewer than 7 x 4, so the run started a second pass
    assert ref.state.epoch == 1 and done.eval_after["eval_loss"] > 0
    assert len(ref.data.eval) > 0
    # a later pass holds the same examples in another seeded order; pass 0 is what iter() (peftlab data) reads
    passes = [[tuple(ex["input_ids"]) for ex in rows] for rows in
              (ref.data.train, ref.data.train.iter_pass(0), ref.data.train.iter_pass(1), ref.data.train.iter_pass(1))]
    assert passes[0] == passes[1] and passes[2] == passes[3] and passes[1] != passes[2]
    assert sorted(passes[1]) == sorted(passes[2]) and len(passes[1]) == ref.data.stats.train_samples

    first = Trainer(recipe_from_dict(_recipe(stream_data, tmp_path / "run")), quiet=True)
    _stop_after(first, 3)
    stopped = first.train()
    assert stopped.preempted and stopped.state.step == 3 and stopped.checkpoint.name == "step-0000003"

    # the source file changed since the checkpoint: refused (the stream's fingerprint hashes the files)
    train_file = stream_data / "train.jsonl"
    original = train_file.read_bytes()
    lines = original.decode().splitlines(keepends=True)
    train_file.write_text("".join([lines[1], lines[0], *lines[2:]]))
    try:
        with pytest.raises(PeftlabError, match="tokenized training data differ"):
            Trainer(recipe_from_dict(_recipe(stream_data, tmp_path / "run", resume="auto")), quiet=True)
    finally:
        train_file.write_bytes(original)

    second = Trainer(recipe_from_dict(_recipe(stream_data, tmp_path / "run", resume="auto")), quiet=True)
    assert (second.state.step, second.state.epoch, second.state.micro_index) == (3, 0, 3)
    # the checkpoint kept the rows the stream had learned make one example each: rows 1-7 (row 0 is held out for
    # eval, row 8 makes none: cut to max_seq_len it has nothing left to train)
    assert second.state.stream_rows == first.state.stream_rows == [8]
    encoded.clear()
    resumed = second.train()
    assert stopped.losses + resumed.losses == done.losses  # bit for bit: the 3 consumed micro-batches skipped
    # the 12 examples skipped hold one whole buffer (8: rows 1-7 and 9): its rows 1-7 were counted, not tokenized
    assert len(encoded) == ref_encoded - 7
    assert (second.state.epoch, second.state.micro_index) == (ref.state.epoch, ref.state.micro_index)
    assert resumed.eval_after["eval_loss"] == done.eval_after["eval_loss"]
    ref_weights, weights = lora_state_dict(ref.model), lora_state_dict(second.model)
    assert all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)


def test_streaming_without_max_steps_is_refused_before_anything_loads(stream_data, tmp_path):
    raw = _recipe(stream_data, tmp_path / "out")
    raw["train"].pop("max_steps")
    raw["train"]["epochs"] = 2
    with pytest.raises(PeftlabError) as e:
        Trainer(recipe_from_dict(raw), quiet=True)
    assert str(e.value).startswith("data.streaming: true needs train.max_steps: a streamed data set's length is "
                                   "unknown until it has been read, so train.epochs (2) cannot be turned into "
                                   "optimizer steps. Set train.max_steps (e.g. --set train.max_steps=1000")
    assert not (tmp_path / "out").exists()  # refused before output.dir was made or the model loaded


@pytest.mark.parametrize("section, message", [
    ({"task": "classification"}, ("data.streaming: true with task=classification: classification/regression rows "
                                  "are read in memory; set data.streaming: false")),
    ({"distill": {"teacher": "builtin:micro-llama", "mode": "offline"}},
     ("data.streaming: true with distill.mode: offline: the teacher cache is indexed by training row, and a stream "
      "has no row indices; set distill.mode: online or data.streaming: false")),
])
def test_streaming_refuses_what_needs_rows_in_memory(stream_data, tmp_path, section, message):
    raw = {**_recipe(stream_data, tmp_path / "out"), **section}
    with pytest.raises(PeftlabError) as e:
        Trainer(recipe_from_dict(raw), quiet=True)
    assert str(e.value) == message
    assert not (tmp_path / "out").exists()
