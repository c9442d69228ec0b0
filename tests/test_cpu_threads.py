"""CPU training uses the cores other processes leave free (loraflow/cpu_threads.py)."""

import pytest
import torch

from loraflow.cpu_threads import ThreadsForLoad, threads_for_load


@pytest.mark.parametrize("cores, load, own, expected", [
    (2, 2.0, 2, 2),   # only us: every core
    (2, 3.1, 2, 1),   # one other busy process beside our two threads
    (2, 2.0, 1, 1),   # it is still there (our one thread + it)
    (2, 1.2, 1, 2),   # it has gone
    (2, 9.0, 2, 1),   # a crowded machine: never below one
    (16, 6.0, 16, 16),  # fewer runnable threads than ours (a load average lags): all cores
    (16, 22.0, 16, 10),
])
def test_threads_for_load(cores, load, own, expected):
    assert threads_for_load(cores, load, own) == expected


def test_the_callback_follows_the_load_average(monkeypatch):
    from types import SimpleNamespace

    before = torch.get_num_threads()
    callback = ThreadsForLoad(every=5, cores=2)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr("os.getloadavg", lambda: (3.2, 3.0, 3.0))
        callback.on_step_begin(None, SimpleNamespace(global_step=3), None)
        assert torch.get_num_threads() == 2  # only every fifth step
        callback.on_step_begin(None, SimpleNamespace(global_step=5), None)
        assert torch.get_num_threads() == 1
        monkeypatch.setattr("os.getloadavg", lambda: (1.1, 2.0, 3.0))
        callback.on_step_begin(None, SimpleNamespace(global_step=10), None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_training_gets_the_callback(tmp_path):
    from tests.test_answer_loss import train_three_steps
    from tests.tiny_llama import build_tiny_llama

    losses = train_three_steps(build_tiny_llama(tmp_path / "tiny"), tmp_path, True, check_callbacks=True)
    assert len(losses) == 3
