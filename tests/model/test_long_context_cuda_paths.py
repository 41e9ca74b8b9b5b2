"""The CUDA branch of the activation offloader (pinned host buffers, a side stream, events, ``record_stream``) run on
the CPU: ``torch.cuda``'s stream and event objects are replaced by fakes that log every call, pinned memory by plain
host memory. It checks the order a GPU relies on (the side stream waits for the compute stream before copying, the
compute stream waits for the fetch before using it, ``record_stream`` on both tensors), the buffer sizes, the host
cache release, and that a model trained through that branch gets the loss and LoRA gradients of the plain
checkpointed run. A GPU run (bench/gpu_check.sh) is what checks the copies really overlap."""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab.model.long_context as lc
from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.model.load import enable_gradient_checkpointing
from peftlab.model.long_context import ActivationOffloader, apply_activation_offload, apply_mlp_chunking
from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss

EXACT = {"atol": 1e-6, "rtol": 1e-5}


class FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event: FakeEvent) -> None:
        assert event.stream is not None, "waited for an event that was never recorded"
        self.log.append(("wait_event", self.name, event.stream.name))


class FakeEvent:
    def __init__(self, log: list) -> None:
        self.log, self.stream = log, None

    def record(self, stream: FakeStream) -> None:
        self.stream = stream
        self.log.append(("record", stream.name))


@pytest.fixture
def fake_cuda(monkeypatch):
    """The offloader's CUDA branch on CPU tensors; returns the call log."""
    log: list = []
    compute = FakeStream("compute", log)
    active = [compute]

    @contextlib.contextmanager
    def stream(s):
        active.append(s)
        log.append(("enter", s.name))
        try:
            yield
        finally:
            active.pop()
            log.append(("exit", s.name))

    monkeypatch.setattr(ActivationOffloader, "uses_streams", staticmethod(lambda device: True))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "Event", lambda: FakeEvent(log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: active[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(lc, "_pinned_empty", lambda n: (log.append(("pin", n)), torch.empty(n, dtype=torch.uint8))[1])
    monkeypatch.setattr(lc, "_record_stream", lambda t, s: log.append(("record_stream", t.data_ptr(), s.name)))
    return log


def test_offload_copies_on_the_side_stream_after_the_compute_stream_and_fetches_before_use(fake_cuda):
    log = fake_cuda
    off = ActivationOffloader()
    xs = [torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(3)]
    before = [x.clone() for x in xs]
    saved = [off.offload(x) for x in xs]
    # per input: the side stream waits for the compute stream, copies into the pinned slot, records its event;
    # record_stream keeps the input's memory from reuse until the copy has read it
    first = log[:log.index(("exit", "side")) + 2]
    assert [e[0] for e in first] == ["pin", "pin", "pin", "wait_stream", "enter", "record", "exit", "record_stream"]
    assert first[2] == ("pin", 64) and first[3] == ("wait_stream", "side", "compute")
    assert first[-1] == ("record_stream", xs[0].data_ptr(), "side")
    # one pinned buffer per pending input, sized to the power of two the host allocator pins anyway
    assert [s.slot for s in saved] == [0, 1, 2] and [b.numel() for b in off.pool] == [64, 64, 64]
    for x, s, b in zip(xs, saved, before):
        x.add_(1)  # the host copy is a copy: the layer input may be freed (and its memory reused)
        assert torch.equal(s.host.view(s.shape), b)
    log.clear()
    got = off.fetch(saved[2])
    assert torch.equal(got, before[2]) and got.shape == xs[2].shape and got.dtype == torch.bfloat16
    # fetched on the side stream after the offload's event; the compute stream waits for the fetch before using it,
    # and record_stream ties the side-stream allocation to the compute stream; then the previous layer is prefetched
    assert log[:6] == [("enter", "side"), ("wait_event", "side", "side"), ("record", "side"), ("exit", "side"),
                       ("wait_event", "compute", "side"), ("record_stream", got.data_ptr(), "compute")]
    assert saved[1].device_copy is not None and saved[0].device_copy is None
    off.release(saved[2])
    assert torch.equal(off.fetch(saved[1]), before[1]) and saved[0].device_copy is not None
    # a longer batch: the idle slot grows to the next power of two, the slot still holding an input is kept
    off.release(saved[1])
    big = off.offload(torch.zeros(2, 3, 40, dtype=torch.bfloat16))
    assert big.slot == 1 and off.pool[1].numel() == 512 and off.pool[0].numel() == 64
    assert off.release_host_buffers() == 64  # slot 2 is idle; slots 0 and 1 hold pending inputs
    assert [b.numel() for b in off.pool] == [64, 512, 0]


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).float()
    model.requires_grad_(False)
    inject_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    model.config.use_cache = False
    enable_gradient_checkpointing(model)
    return model.train()


def loss_and_grads(model):
    ids = torch.randint(0, 300, (1, 13), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss = causal_lm_loss(model, batch, normalizer=12.0, settings=LossSettings(backend="torch"))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_step_through_the_stream_branch_gives_the_checkpointed_loss_and_gradients(fake_cuda):
    ref_loss, ref = loss_and_grads(tiny())
    model = tiny()
    apply_activation_offload(model)
    apply_mlp_chunking(model, 5)
    for _ in range(2):  # the second step reuses the pinned buffers of the first
        model.zero_grad(set_to_none=True)
        loss, got = loss_and_grads(model)
        torch.testing.assert_close(loss, ref_loss, **EXACT)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **EXACT, msg=lambda m, k=k: f"{k}: {m}")
    (off,) = lc.offloaders(model)
    assert off.pending == [] and len(off.pool) == 3
    assert sum(e[0] == "pin" and e[1] > 0 for e in fake_cuda) == 3  # pinned once per layer, not once per step
    assert lc.release_host_buffers(model) == 3 * 2048  # 13 x 32 fp32 = 1664 bytes -> 2048, idle after the step
    assert [b.numel() for b in off.pool] == [0, 0, 0]
