"""Weight-decay schedules against independent oracles: DINO's `cosine_scheduler`, Megatron's `get_wd`."""

import dataclasses
import math
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import dino_cosine_scheduler

from lightning_nodecay._schedules import as_schedule, constant, cosine, linear

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)
EXACT = {"rel": 1e-12, "abs": 1e-15}


def megatron_get_wd(num_steps, start_wd, end_wd, wd_incr_steps):
    """NVIDIA Megatron-LM `OptimizerParamScheduler.get_wd` with `wd_incr_style="linear"`, transcribed."""
    if num_steps > wd_incr_steps:
        return end_wd
    incr_ratio = float(num_steps) / float(wd_incr_steps)
    return start_wd + incr_ratio * (end_wd - start_wd)


def linear_oracle(step, start, end, total_steps, warmup_steps, warmup_start):
    """By hand: `numpy.linspace(warmup_start, start, warmup_steps)` over the warm-up, then a line to `end`."""
    if step < warmup_steps:
        return warmup_start if warmup_steps == 1 else warmup_start + (start - warmup_start) * step / (warmup_steps - 1)
    length = total_steps - warmup_steps
    return end if length == 0 else start + (end - start) * min(step - warmup_steps, length) / length


# (base_value, final_value, epochs, niter_per_ep, warmup_epochs, start_warmup_value)
DINO_CASES = [
    (0.04, 0.4, 100, 7, 0, 0.0),  # DINO's weight decay: no warm-up
    (5e-4, 1e-6, 20, 9, 3, 0.0),  # DINO's learning rate shape: warm-up from 0, then decay
    (0.4, 0.04, 6, 5, 1, 0.01),  # decreasing, warm-up from a non-zero value
    (0.3, 0.2, 4, 1, 1, 0.1),  # per epoch; a one-step warm-up is `start_warmup_value` alone
    (0.1, 0.5, 3, 4, 3, 0.0),  # the warm-up is the whole schedule
    (0.2, 0.1, 1, 1, 0, 0.0),  # a single step
    (0.05, 0.05, 5, 2, 2, 0.0),  # flat after the warm-up
]


@pytest.mark.parametrize(("base", "final", "epochs", "niter", "warmup_epochs", "warmup_start"), DINO_CASES)
def test_cosine_equals_dino_cosine_scheduler(base, final, epochs, niter, warmup_epochs, warmup_start):
    expected = dino_cosine_scheduler(base, final, epochs, niter, warmup_epochs, warmup_start)
    wd = cosine(base, final, epochs * niter, warmup_steps=warmup_epochs * niter, warmup_start=warmup_start)
    assert [wd(step) for step in range(epochs * niter)] == pytest.approx(expected.tolist(), **EXACT)


@PROPERTY
@given(
    base=st.floats(0, 10),
    final=st.floats(0, 10),
    warmup_start=st.floats(0, 10),
    epochs=st.integers(1, 30),
    niter=st.integers(1, 20),
    data=st.data(),
)
def test_cosine_equals_dino_cosine_scheduler_everywhere(base, final, warmup_start, epochs, niter, data):
    warmup_epochs = data.draw(st.integers(0, epochs), label="warmup_epochs")
    expected = dino_cosine_scheduler(base, final, epochs, niter, warmup_epochs, warmup_start)
    wd = cosine(base, final, epochs * niter, warmup_steps=warmup_epochs * niter, warmup_start=warmup_start)
    assert [wd(step) for step in range(epochs * niter)] == pytest.approx(expected.tolist(), **EXACT)


@pytest.mark.parametrize("total_steps", [1, 2, 17, 1000])
@pytest.mark.parametrize(("start", "end"), [(0.0, 0.1), (0.1, 0.01), (0.05, 0.05)])
def test_linear_without_warmup_equals_megatron(start, end, total_steps):
    wd = linear(start, end, total_steps)
    steps = range(total_steps + 3)
    expected = [megatron_get_wd(s, start, end, total_steps) for s in steps]
    assert [wd(s) for s in steps] == pytest.approx(expected, **EXACT)


@pytest.mark.parametrize(
    ("start", "end", "total_steps", "warmup_steps", "warmup_start"),
    [(0.1, 0.0, 10, 4, 0.02), (0.0, 0.2, 7, 1, 0.3), (0.1, 0.3, 5, 5, 0.0), (0.1, 0.3, 5, 0, 0.7), (0.4, 0.4, 3, 2, 0)],
)
def test_linear_equals_hand_oracle(start, end, total_steps, warmup_steps, warmup_start):
    wd = linear(start, end, total_steps, warmup_steps=warmup_steps, warmup_start=warmup_start)
    steps = range(total_steps + 3)
    expected = [linear_oracle(s, start, end, total_steps, warmup_steps, warmup_start) for s in steps]
    assert [wd(s) for s in steps] == pytest.approx(expected, **EXACT)


@pytest.mark.parametrize("schedule", [cosine, linear])
def test_no_warmup_starts_at_start(schedule):
    assert schedule(0.3, 0.1, 10, warmup_steps=0, warmup_start=0.9)(0) == 0.3


@pytest.mark.parametrize("schedule", [cosine, linear])
def test_warmup_ends_at_start_and_the_next_phase_starts_there_again(schedule):
    wd = schedule(0.3, 0.1, 10, warmup_steps=4, warmup_start=0.0)
    assert [wd(s) for s in range(5)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3], **EXACT)
    assert wd(3) == 0.3  # exactly: the endpoint of the linspace


@pytest.mark.parametrize("schedule", [cosine, linear])
def test_warmup_of_one_step_is_warmup_start_alone(schedule):
    wd = schedule(0.3, 0.1, 10, warmup_steps=1, warmup_start=0.05)
    assert (wd(0), wd(1)) == (0.05, 0.3)


@pytest.mark.parametrize("schedule", [cosine, linear])
def test_warmup_over_all_steps_then_end(schedule):
    wd = schedule(0.3, 0.1, 4, warmup_steps=4, warmup_start=0.0)
    assert [wd(s) for s in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.1, 0.1], **EXACT)


@pytest.mark.parametrize("schedule", [cosine, linear])
def test_end_from_total_steps_on(schedule):
    wd = schedule(0.04, 0.4, 50, warmup_steps=5, warmup_start=0.01)
    assert [wd(s) for s in (50, 51, 10**9)] == [0.4, 0.4, 0.4]


def test_cosine_never_quite_reaches_end_before_total_steps():
    wd = cosine(0.04, 0.4, 100)
    assert wd(99) < 0.4
    assert wd(99) == pytest.approx(0.4 - 0.36 * (1 - math.cos(math.pi / 100)) / 2, **EXACT)


def test_linear_reaches_end_at_total_steps():
    wd = linear(0.0, 0.1, 10)
    assert (wd(9), wd(10)) == (pytest.approx(0.09, **EXACT), 0.1)


def test_constant_after_warmup():
    wd = constant(0.05, warmup_steps=3, warmup_start=0.02)
    assert [wd(s) for s in range(5)] == pytest.approx([0.02, 0.035, 0.05, 0.05, 0.05], **EXACT)
    assert (constant(0.05)(0), constant(0.05)(10**9)) == (0.05, 0.05)


@pytest.mark.parametrize("schedule", [cosine, linear])
@pytest.mark.parametrize(("epochs", "steps_per_epoch"), [(10, 7), (3, 100)])
def test_unit_agnostic_per_epoch_equals_per_step_at_epoch_starts(schedule, epochs, steps_per_epoch):
    per_epoch = schedule(0.04, 0.4, epochs)
    per_step = schedule(0.04, 0.4, epochs * steps_per_epoch)
    expected = [per_step(e * steps_per_epoch) for e in range(epochs + 1)]
    assert [per_epoch(e) for e in range(epochs + 1)] == pytest.approx(expected, **EXACT)


@PROPERTY
@given(start=st.floats(0, 1e3), end=st.floats(0, 1e3), total_steps=st.integers(1, 300), data=st.data())
@pytest.mark.parametrize("schedule", [cosine, linear])
def test_after_warmup_within_bounds_and_monotone(schedule, start, end, total_steps, data):
    warmup_steps = data.draw(st.integers(0, total_steps), label="warmup_steps")
    wd = schedule(start, end, total_steps, warmup_steps=warmup_steps, warmup_start=data.draw(st.floats(0, 1e3)))
    values = [wd(step) for step in range(warmup_steps, total_steps + 3)]
    assert all(min(start, end) <= v <= max(start, end) for v in values)
    if start >= end:
        assert all(later <= earlier for earlier, later in pairwise(values))
    if start <= end:
        assert all(later >= earlier for earlier, later in pairwise(values))


@pytest.mark.parametrize("schedule", [cosine(0.04, 0.4, 10), linear(0.1, 0.0, 10), constant(0.05)])
def test_schedules_are_frozen_and_as_schedule_keeps_them(schedule):
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.warmup_steps = 3
    assert as_schedule(schedule) is schedule


@pytest.mark.parametrize(("spec", "expected"), [(0.05, 0.05), (0, 0.0), (3, 3.0)])
def test_as_schedule_of_a_number_is_constant(spec, expected):
    wd = as_schedule(spec)
    assert wd == constant(expected)
    assert type(wd(7)) is float


def test_as_schedule_of_a_callable_passes_its_values_through():
    wd = as_schedule(lambda step: 0.1 / (step + 1))
    assert [wd(s) for s in range(3)] == [0.1, 0.05, 0.1 / 3]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: cosine(-0.1, 0.4, 10), ValueError, r"`start` is -0\.1; a weight decay must be a finite float >= 0"),
        (lambda: cosine(0.04, math.nan, 10), ValueError, r"`end` is nan; a weight decay must be a finite float >= 0"),
        (lambda: linear(0.04, math.inf, 10), ValueError, r"`end` is inf; a weight decay must be a finite float >= 0"),
        (lambda: linear(0.0, 0.1, 10, 2, -1.0), ValueError, r"`warmup_start` is -1\.0; a weight decay must be"),
        (lambda: constant(-0.05), ValueError, r"`value` is -0\.05; a weight decay must be a finite float >= 0"),
        (lambda: constant(0.05, warmup_start=math.nan), ValueError, r"`warmup_start` is nan"),
        (lambda: cosine("0.04", 0.4, 10), TypeError, r"`start` must be a float such as 0\.05; got '0\.04'"),
        (lambda: cosine(0.04, True, 10), TypeError, r"`end` must be a float such as 0\.05; got True"),
        (lambda: cosine(0.04, 0.4, 0), ValueError, r"`total_steps` is 0; pass the schedule's length, a positive"),
        (lambda: linear(0.04, 0.4, -5), ValueError, r"`total_steps` is -5; .*`trainer\.estimated_stepping_batches`"),
        (lambda: cosine(0.04, 0.4, math.inf), TypeError, r"`total_steps` must be an int, .*got inf\. Pass `int"),
        (lambda: linear(0.04, 0.4, 10.0), TypeError, r"`total_steps` must be an int, a number of steps or epochs"),
        (lambda: cosine(0.04, 0.4, 10, 11), ValueError, r"`warmup_steps` \(11\) is more than `total_steps` \(10\)"),
        (lambda: linear(0.04, 0.4, 10, -1), ValueError, r"`warmup_steps` is -1; pass 0 for no warm-up"),
        (lambda: constant(0.05, warmup_steps=-2), ValueError, r"`warmup_steps` is -2; pass 0 for no warm-up"),
        (lambda: constant(0.05, warmup_steps=2.5), TypeError, r"`warmup_steps` must be an int"),
    ],
)
def test_bad_arguments_are_named_with_the_fix(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("schedule", [cosine(0.04, 0.4, 10), linear(0.1, 0.0, 10), constant(0.05)])
def test_bad_steps_are_named_with_the_fix(schedule):
    with pytest.raises(ValueError, match=r"`step` is -1; schedules start at step 0: pass `trainer\.global_step`"):
        schedule(-1)
    with pytest.raises(TypeError, match=r"`step` must be an int, a number of steps or epochs; got 1\.5"):
        schedule(1.5)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("cosine", TypeError, r"`weight_decay` must be a schedule such as `cosine\(0\.04, 0\.4, total_steps\)`, a"),
        (None, TypeError, r"`weight_decay` must be a schedule .* or a float such as 0\.05; got None"),
        (True, TypeError, r"`weight_decay` must be a schedule"),
        (-0.1, ValueError, r"`weight_decay` is -0\.1; a weight decay must be a finite float >= 0, such as 0\.05"),
        (math.nan, ValueError, r"`weight_decay` is nan; a weight decay must be a finite float >= 0"),
    ],
)
def test_as_schedule_rejects_what_is_no_schedule(spec, error, match):
    with pytest.raises(error, match=match):
        as_schedule(spec, name="weight_decay")


@pytest.mark.parametrize(
    ("function", "error", "match"),
    [
        (lambda step: 0.1 - 0.05 * step, ValueError, r"`spec` at step 3 is -0\.05.*; a weight decay must be a finite"),
        (lambda step: math.nan if step == 3 else 0.1, ValueError, r"`spec` at step 3 is nan; a weight decay must be"),
        (lambda step: math.inf, ValueError, r"`spec` at step 3 is inf; a weight decay must be a finite float >= 0"),
        (lambda step: None, TypeError, r"`spec` at step 3 must be a float such as 0\.05; got None"),
        (lambda step: np.array([0.1]), TypeError, r"`spec` at step 3 must be a float such as 0\.05; got array"),
    ],
)
def test_a_callable_is_checked_when_called_naming_the_step(function, error, match):
    wd = as_schedule(function)  # no error yet: values are checked when the schedule is called
    with pytest.raises(error, match=match):
        wd(3)
