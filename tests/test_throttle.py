"""The training progress artifact is updated at most every few seconds (loraflow.runtime.throttle), on a fake clock."""

from loraflow.runtime.throttle import Throttle


def test_at_most_one_call_per_interval_and_the_forced_last_one_always():
    now = [0.0]
    throttle = Throttle(5.0, clock=lambda: now[0])
    passed = []
    for step in range(1, 101):  # 100 steps of 0.3 s: 30 s of training
        now[0] += 0.3
        if throttle.ready(force=step == 100):
            passed.append(step)
    assert passed[0] == 1 and passed[-1] == 100
    assert passed == [1, 18, 35, 52, 69, 86, 100]  # every 5.1 s of steps, then the last one forced: 7 calls, not 100

