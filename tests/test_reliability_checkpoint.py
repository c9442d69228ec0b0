"""The disk fills up while training saves a checkpoint (tiny model, real Trainer, in a subprocess whose file
size limit drops to 4 kB after the step-2 checkpoint, so the step-4 save fails with EFBIG): one clear error
naming the checkpoint folder and the full disk; the partial checkpoint is removed, checkpoint-2 is intact,
and once there is room again the re-run resumes from it and finishes.

A kill -9 in the middle of a checkpoint save leaves the same state (a folder without its completion marker):
test_train.py removes such a folder on resume, test_kill_resume.py kills real training processes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

TRAIN = """
import resource, signal, sys
from pathlib import Path
from transformers import AutoTokenizer, TrainerCallback
from loraflow.config.train import TrainConfig
from loraflow.store import DiskFullError
from tasks.train import checkpoint_is_complete, train_adapter
from tests.tiny_llama import build_tiny_llama, tokens_frame

root = Path(sys.argv[1])
model_dir = build_tiny_llama(root / "model")
tokens = tokens_frame(AutoTokenizer.from_pretrained(model_dir))
_, hard_limit = resource.getrlimit(resource.RLIMIT_FSIZE)

class FillTheDiskAfterStep3(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, not a signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard_limit))

config = TrainConfig(max_steps=4, micro_batch_size=2, learning_rate=1e-2, lr_scheduler="constant", warmup_ratio=0.0,
                     checkpoint_every=2, lora_r=8, lora_alpha=16, cpu_threads=1, precision="fp32")
checkpoints = root / "train" / "checkpoints"
try:
    train_adapter(tokens, model_dir, config, root / "train", callbacks=[FillTheDiskAfterStep3()])
    print("NO ERROR")
except DiskFullError as error:
    print("ERROR", error.strerror)
print("LEFT", sorted(p.name for p in checkpoints.iterdir()), checkpoint_is_complete(checkpoints / "checkpoint-2"))

resource.setrlimit(resource.RLIMIT_FSIZE, (hard_limit, hard_limit))  # room again
result = train_adapter(tokens, model_dir, config, root / "train")
print("RESUMED", result.resumed_from_step, result.global_step)
"""


def test_disk_full_during_a_checkpoint_save(tmp_path):
    done = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()
             if line.split(" ", 1)[0] in ("ERROR", "NO", "LEFT", "RESUMED")}
    if "NO" in lines:
        pytest.fail("the checkpoint save did not hit the file-size limit")
    checkpoints = tmp_path / "train" / "checkpoints"
    assert lines["ERROR"].startswith(f"disk full writing a checkpoint in {checkpoints}"), lines["ERROR"]
    assert "free space" in lines["ERROR"] and "checkpoint-2 is intact and a re-run resumes from it" in lines["ERROR"]
    assert lines["LEFT"] == "['checkpoint-2'] True"  # the partial checkpoint-4 is gone, checkpoint-2 complete
    assert lines["RESUMED"] == "2 4"
