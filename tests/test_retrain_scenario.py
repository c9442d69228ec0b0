"""benchmarks/retrain_scenario.py's pure helper: which eval.gate settings let a refused gate's FAIL lines pass
(the benchmark itself runs the demo config through a server: too slow for the suite)."""

from benchmarks.retrain_scenario import loosened_gate


def test_each_fail_line_loosens_the_setting_that_refused_it():
    failures = [
        "FAIL: natural_fact_accuracy 0.500, n=8 >= champion's 0.625, n=8 - 0.020 (natural questions)",
        "FAIL: validation loss 2.0000 <= champion's 1.0000 + 10% (30 example(s), 400 token(s))",
        "FAIL: false_refusal_rate 0.100 <= 0.020 (known titles refused, natural questions, n=10)",
        "FAIL: refusal_rate 0.500 >= 0.600 (made-up titles refused, n=8)",
        "FAIL: natural_fact_accuracy 0.500 >= 0.850 (natural questions, n=8)",
        "FAIL: fact accuracy 0.700 >= 0.800 (trained phrasings, n=24)",
        "FAIL: fact_accuracy 0.100 beats base 0.200",
    ]
    assert loosened_gate(failures) == {
        "previous_tolerance": 1.0, "previous_loss_tolerance": 100.0, "max_false_refusal_rate": None,
        "min_refusal_rate": None, "min_natural_fact_accuracy": None, "min_fact_accuracy": 0.0, "must_beat_base": False,
    }


def test_a_passed_gate_loosens_nothing():
    assert loosened_gate([]) == {}
