"""kill -9 during training, then a re-run: it resumes from the last complete checkpoint, the step count
continues, and on CPU fp32 the resumed steps' losses equal an uninterrupted run's (tolerance 1e-5).

This test found three bugs: the resumed run crashed reading a checkpoint Trainer had already rotated away;
LoRA's initial weights were drawn before the seed was set; and Trainer's length-grouped sampler replayed the
first epoch's order after a resume (loraflow.training.trainer.resumable_trainer_class)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from loraflow.training.checkpoints import CHECKPOINT_MARKER

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TRAIN = """
import sys, time, pandas as pd
from transformers import AutoTokenizer, TrainerCallback
from loraflow.config.train import TrainConfig
from tasks.train import train_adapter
from tests.tiny_llama import build_tiny_llama, tokens_frame
model_dir, out, hang_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokens = tokens_frame(AutoTokenizer.from_pretrained(model_dir))
class HangAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == hang_after:
            print("HANGING", flush=True)
            time.sleep(600)
config = TrainConfig(max_steps=8, micro_batch_size=2, learning_rate=1e-2, lr_scheduler="constant", warmup_ratio=0.0,
                     checkpoint_every=2, lora_r=8, lora_alpha=16, cpu_threads=1, precision="fp32")
result = train_adapter(tokens, model_dir, config, out, callbacks=[HangAt()] if hang_after else [])
print("RESULT", result.global_step, result.resumed_from_step, result.loss_curve_path, flush=True)
"""


def train(model_dir: Path, out: Path, hang_after: int = 0, capture_errors: bool = True) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAIN, str(model_dir), str(out), str(hang_after)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE if capture_errors else subprocess.DEVNULL, text=True)


def test_kill_minus_nine_then_resume_matches_uninterrupted(tmp_path):
    from tests.tiny_llama import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "model")
    reference = train(model_dir, tmp_path / "reference")
    killed = train(model_dir, tmp_path / "killed", hang_after=5, capture_errors=False)
    for line in killed.stdout:  # wait until step 5 is done (checkpoint-4 complete), then kill -9
        if line.startswith("HANGING"):
            break
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-4" / CHECKPOINT_MARKER).exists()

    resumed = train(model_dir, tmp_path / "killed")
    resumed_out, resumed_err = resumed.communicate(timeout=600)
    reference_out, reference_err = reference.communicate(timeout=600)
    assert resumed.returncode == 0, resumed_err[-3000:]
    assert reference.returncode == 0, reference_err[-3000:]
    _, step, resumed_from, curve_path = resumed_out.strip().splitlines()[-1].split(" ", 3)
    assert (int(step), resumed_from) == (8, "4")
    reference_curve = pd.read_parquet(reference_out.strip().splitlines()[-1].split(" ", 3)[3]).set_index("step")
    resumed_curve = pd.read_parquet(curve_path).set_index("step")
    assert list(resumed_curve.index) == [5, 6, 7, 8]
    assert list(reference_curve.index) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert resumed_curve["loss"].notna().all()
    # Same steps, same batches, same weights: the resumed curve continues the uninterrupted one.
    pd.testing.assert_series_equal(resumed_curve["loss"], reference_curve["loss"].loc[5:], rtol=0, atol=1e-5)
