"""Tensor accounting: activations carried between counts of a batch shape, optimizer states
walked again only when they can have changed. Real tiny models on the CPU."""

from __future__ import annotations

import dataclasses

import torch

from collector.monitor import StepMonitor
from collector.tensors import ActivationCounter, OptimizerStateMeter, optimizer_state_bytes
from trainer.config import validate_config
from trainer.loop import make_monitor, setup, train


def _tiny_llama():
    cfg = validate_config({"train": {"max_steps": 1}, "data": {"seq_len": 64}})
    return setup(cfg, torch.device("cpu")).built.model


def _forward(model, batch: int, seq: int) -> torch.Tensor:
    ids = torch.randint(0, 100, (batch, seq))
    return model(input_ids=ids, labels=ids).loss


def test_a_shape_is_counted_once_then_carried_with_the_same_bytes():
    model = _tiny_llama()
    counter = ActivationCounter(model)
    with counter.forward((2, 64)):
        _forward(model, 2, 64).backward()
    counted = counter.take_peak()
    with counter.forward((2, 64)):
        _forward(model, 2, 64).backward()
    carried = counter.take_peak()
    with counter.forward((2, 64), recount=True):
        _forward(model, 2, 64).backward()
    recounted = counter.take_peak()
    assert counted > 0
    assert carried == counted == recounted
    assert (counter.counted_forwards, counter.carried_forwards) == (2, 1)
    assert not counter.varying_shapes


def test_a_new_shape_is_counted_and_grows_with_the_sequence():
    model = _tiny_llama()
    counter = ActivationCounter(model)
    with counter.forward((2, 64)):
        _forward(model, 2, 64)
    short = counter.take_peak()
    with counter.forward((2, 128)):
        _forward(model, 2, 128)
    long = counter.take_peak()
    assert counter.counted_forwards == 2 and counter.carried_forwards == 0
    assert 1.8 * short < long


def test_current_bytes_is_unknown_inside_a_carried_forward_and_the_shape_total_after_it():
    model = _tiny_llama()
    counter = ActivationCounter(model)
    with counter.forward((1, 32)):
        _forward(model, 1, 32)
    total = counter.take_peak()
    seen_inside = []
    with counter.forward((1, 32)):
        seen_inside.append(counter.current_bytes)
        _forward(model, 1, 32)
    assert seen_inside == [None]
    # A failure in backward after a carried forward reads what that forward saved.
    assert counter.current_bytes == total


def test_a_failed_carried_forward_does_not_update_the_peak():
    model = _tiny_llama()
    counter = ActivationCounter(model)
    with counter.forward((1, 32)):
        _forward(model, 1, 32)
    counter.take_peak()
    try:
        with counter.forward((1, 32)):
            raise MemoryError("failed mid-forward")
    except MemoryError:
        pass
    assert counter.take_peak() == 0 and counter.carried_forwards == 0


class _KeepsTheLargeOnes(torch.nn.Module):
    """Saves for backward a number of elements that depends on the data, not on the shape
    (as a mixture of experts' routing does)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x[x > 0]
        return (kept * kept * self.weight).sum()


def test_a_shape_whose_recount_disagrees_is_counted_on_every_forward_from_then_on():
    model = _KeepsTheLargeOnes()
    counter = ActivationCounter(model)
    with counter.forward((4, 4)):
        model(torch.ones(4, 4))
    with counter.forward((4, 4), recount=True):
        model(-torch.ones(4, 4).index_fill_(0, torch.tensor([0]), 1.0))
    assert counter.varying_shapes == {(4, 4)}
    counter.take_peak()
    with counter.forward((4, 4)):
        model(torch.ones(4, 4))
    assert counter.counted_forwards == 3 and counter.carried_forwards == 0
    assert counter.take_peak() > 0


def _run(recount_every: int, **data) -> list:
    cfg = validate_config(
        {
            "train": {"max_steps": 12, "micro_batch_size": 2},
            "data": {"seq_len": 96, **data},
            "monitor": {"activation_recount_every": recount_every},
        }
    )
    training = setup(cfg, torch.device("cpu"))
    samples: list = []
    monitor = make_monitor(cfg, training, samples.append)
    train(training, monitor)
    monitor.close()
    return [s for s in samples if dataclasses.is_dataclass(s) and hasattr(s, "tensors")]


def test_carried_activation_bytes_equal_counting_every_step_on_a_variable_length_run():
    every = [s.tensors.activation_bytes for s in _run(1, vary_length=True)]
    carried = [s.tensors.activation_bytes for s in _run(10, vary_length=True)]
    assert len(every) == 12 and all(b > 0 for b in every)
    assert carried == every
    assert len(set(every)) > 1  # the lengths really varied


def test_the_default_config_carries_activations_between_recounts():
    cfg = validate_config({"train": {"max_steps": 12}, "data": {"seq_len": 64}})
    training = setup(cfg, torch.device("cpu"))
    monitor = make_monitor(cfg, training, lambda record: None)
    train(training, monitor)
    counter = monitor._activations
    # Steps 1-2 are layer-profiled (counted), step 10 recounts; the rest carry.
    assert counter.counted_forwards == 3 and counter.carried_forwards == 9


def test_optimizer_state_meter_walks_again_when_states_appear_or_every_nth_read():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    optimizer = torch.optim.AdamW(model.parameters())
    meter = OptimizerStateMeter(optimizer, recount_every=3)
    assert meter.read() == 0
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    assert meter.read() == optimizer_state_bytes(optimizer) > 0
    # A state grown in place is seen at the next periodic walk, not before.
    first = next(iter(optimizer.state.values()))
    first["extra"] = torch.zeros(1000)
    reads = [meter.read() for _ in range(3)]
    assert reads[-1] == optimizer_state_bytes(optimizer)
    assert reads[0] < reads[-1]


def test_a_post_mortem_breakdown_walks_the_optimizer_now():
    cfg = validate_config({"train": {"max_steps": 2}, "data": {"seq_len": 32}})
    training = setup(cfg, torch.device("cpu"))
    monitor = StepMonitor(training.built.model, training.optimizer, torch.device("cpu"), lambda r: None)
    train(training, monitor)
    assert monitor.breakdown_now().optimizer_state_bytes == optimizer_state_bytes(training.optimizer) > 0
