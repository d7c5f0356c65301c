"""sparsert.choice: a plan's choice, call by call, between its ops split between threads and all on one, played
against given call times; and the plans that carry both tables."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import sparsert
from sparsert import choice, plan
from sparsert.choice import SERIAL, SPLIT, SplitChoice
from sparsert.kernels import executor as ex


def play(chooser, seconds_of, calls, start=0.0):
    """Run `calls` calls, table t taking seconds_of(t, now) each; returns the tables run and the clock after."""
    now, ran = start, []
    for _ in range(calls):
        table = chooser.next(now)
        seconds = seconds_of(table, now)
        now += seconds
        chooser.record(table, seconds, now)
        ran.append(table)
    return ran, now


def test_settles_on_the_split_table_then_tries_the_serial_one_and_keeps_the_faster():
    chooser = SplitChoice()
    ran, _ = play(chooser, lambda t, now: 1e-3 if t == SPLIT else 2e-3, 200)
    first = choice.MIN_CALLS_BETWEEN
    assert ran[:first] == [SPLIT] * first
    assert ran[first:first + choice.SETTLE] == [SERIAL] * choice.SETTLE  # the other gets its first tries in a row
    assert chooser.chosen == SPLIT and ran[-50:].count(SERIAL) <= 1

    chooser = SplitChoice()
    ran, _ = play(chooser, lambda t, now: 2e-3 if t == SPLIT else 1e-3, 200)
    assert chooser.chosen == SERIAL and ran[-100:].count(SPLIT) <= 2
    assert chooser.calls[SERIAL] + chooser.calls[SPLIT] == 200 and chooser.calls[SERIAL] / 200 > 0.8


def test_a_clear_loss_backs_the_tries_off_up_to_the_cap_and_a_near_tie_resets_them():
    chooser = SplitChoice()
    play(chooser, lambda t, now: 1e-3 if t == SPLIT else 3e-3, 5000)
    assert chooser.probe_seconds == choice.MAX_PROBE_SECONDS
    # tries at most every MAX_PROBE_SECONDS: a second of calls holds about 1 / MAX_PROBE_SECONDS of them
    before = chooser.calls[SERIAL]
    _, _ = play(chooser, lambda t, now: 1e-3 if t == SPLIT else 3e-3, 1000, start=10.0)
    assert chooser.calls[SERIAL] - before <= 1.0 / choice.MAX_PROBE_SECONDS + 1
    play(chooser, lambda t, now: 1e-3 if t == SPLIT else 1.02e-3, 2000, start=20.0)
    assert chooser.chosen == SPLIT and chooser.probe_seconds == choice.PROBE_SECONDS


def test_follows_the_host_moving_the_cores_both_ways_within_a_few_calls():
    """Split runs 0.8 ms while the cores share a die and 2.3 ms while they do not; serial 1.05 ms throughout.
    Each flip is followed within a few dozen calls, not after the backed-off interval."""
    two_dies = [False]
    chooser = SplitChoice()

    def seconds(table, now):
        return 1.05e-3 if table == SERIAL else (2.3e-3 if two_dies[0] else 0.8e-3)

    play(chooser, seconds, 3000)
    assert chooser.chosen == SPLIT and chooser.probe_seconds == choice.MAX_PROBE_SECONDS
    two_dies[0] = True
    ran, now = play(chooser, seconds, 300, start=100.0)
    assert chooser.chosen == SERIAL and ran.index(SERIAL) <= 2 * choice.WINDOW and ran[-200:].count(SPLIT) <= 4
    two_dies[0] = False
    ran, _ = play(chooser, seconds, 2000, start=now + 1.0)
    # serial's own times do not change: the periodic tries find split faster again
    assert chooser.chosen == SPLIT and ran[-100:].count(SERIAL) <= 3


@pytest.fixture(scope="module")
def resnet():
    """A CIFAR ResNet18, 90% of every conv's weights pruned: its batch-1 plan splits most ops between threads."""
    torch.manual_seed(0)
    model = sparsert.models.cifar_resnet18().eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(m, "weight", 0.9)
    return model


def test_a_batch_1_plan_keeps_a_serial_table_whose_results_are_the_split_ones(resnet, monkeypatch):
    monkeypatch.setattr(plan, "SPLIT_CHOICE", True)
    sparse = sparsert.sparsify(resnet)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        p = sparse.plan_for(x)
        assert p.ops[:, 1].any() and p.choice is not None and not p.serial_ops[:, 1].any()
        others = [0] + list(range(2, p.ops.shape[1]))  # every column but the parallel flag
        np.testing.assert_array_equal(p.serial_ops[:, others], p.ops[:, others])
        outputs = [sparse(x) for _ in range(40)]
        assert sum(p.choice.calls) == 40 and min(p.choice.calls) >= choice.SETTLE  # both tables ran
        for out in outputs[1:]:
            torch.testing.assert_close(out, outputs[0], rtol=0, atol=0)  # same sums in the same order
        ref = resnet(x)
    torch.testing.assert_close(outputs[0], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_no_second_table_when_switched_off_or_when_nothing_runs_in_parallel(resnet, monkeypatch):
    monkeypatch.setattr(plan, "SPLIT_CHOICE", False)
    with torch.no_grad():
        assert sparsert.sparsify(resnet).plan_for(torch.randn(1, 3, 32, 32)).choice is None
    monkeypatch.setattr(plan, "SPLIT_CHOICE", True)
    p = plan.Plan(ops=np.zeros((1, 2 + ex.N_PARAMS), np.int64), f32=np.zeros(1, np.float32),
                  u32=np.zeros(1, np.uint32), u16=np.zeros(1, np.uint16), u8=np.zeros(1, np.uint8), arena_size=16,
                  output=(0, "features", (1, 1)), input_shape=(1, 1))
    assert p.choice is None


def test_long_calls_try_the_other_table_at_most_every_few_dozen_calls():
    """A batch of 64 takes ~10 ms a call: a try every 20 ms of a table twice as slow would cost a third."""
    chooser = SplitChoice()
    ran, _ = play(chooser, lambda t, now: 10e-3 if t == SPLIT else 20e-3, 2000)
    assert choice.MIN_CALLS_BETWEEN == 32 and choice.MAX_PROBE_SECONDS < 32 * 10e-3  # the floor binds here
    assert chooser.chosen == SPLIT and ran[100:].count(SERIAL) <= len(ran[100:]) // 32 + 1

