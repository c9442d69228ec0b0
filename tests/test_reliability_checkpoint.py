"""A checkpoint save that does not finish (tiny model, real Trainer, in subprocesses), after checkpoint-2 was
saved whole:

- kill -9 in the middle of the step-4 save (paused inside it, after the weights, before the optimizer state):
  the re-run removes the partial checkpoint-4, resumes from checkpoint-2 and finishes;
- the disk fills up (the file size limit drops to 4 kB after step 3, so the step-4 save fails with EFBIG):
  one clear error naming the checkpoint folder and the full disk; the partial checkpoint is removed,
  checkpoint-2 is intact, and once there is room again the re-run resumes from it and finishes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SETUP = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
from loraflow.config.train import TrainConfig
from tests.tiny_llama import build_tiny_llama, tokens_frame

root = Path(sys.argv[1])
model_dir = build_tiny_llama(root / "model")
tokens = tokens_frame(AutoTokenizer.from_pretrained(model_dir))
config = TrainConfig(max_steps=4, micro_batch_size=2, learning_rate=1e-2, lr_scheduler="constant", warmup_ratio=0.0,
                     checkpoint_every=2, lora_r=8, lora_alpha=16, cpu_threads=1, precision="fp32")
checkpoints = root / "train" / "checkpoints"
"""

KILLED_IN_SAVE = SETUP + """
import torch
from tasks.train import train_adapter

real_save = torch.save
def save_then_wait(obj, path, *args, **kwargs):
    if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
        print("PAUSED", sorted(p.name for p in (checkpoints / "checkpoint-4").iterdir()), flush=True)
        sys.stdin.read()  # until killed
    return real_save(obj, path, *args, **kwargs)
torch.save = save_then_wait
train_adapter(tokens, model_dir, config, root / "train")
"""

RESUME = SETUP + """
from loraflow.training.checkpoints import CHECKPOINT_MARKER
from tasks.train import train_adapter
print("BEFORE", sorted(p.name for p in checkpoints.iterdir()), (checkpoints / "checkpoint-4" / CHECKPOINT_MARKER).exists())
result = train_adapter(tokens, model_dir, config, root / "train")
print("RESUMED", result.resumed_from_step, result.global_step)
"""

DISK_FILLS_IN_SAVE = SETUP + """
import resource, signal
from transformers import TrainerCallback
from loraflow.runtime.artifact_store import DiskFullError
from loraflow.training.checkpoints import checkpoint_is_complete
from tasks.train import train_adapter

_, hard_limit = resource.getrlimit(resource.RLIMIT_FSIZE)

class FillTheDiskAfterStep3(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, not a signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard_limit))

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


def python(script: str, root: Path, **kwargs):
    return subprocess.Popen([sys.executable, "-c", script, str(root)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_kill_9_during_a_checkpoint_save(tmp_path):
    trainer = python(KILLED_IN_SAVE, tmp_path)
    paused = trainer.stdout.readline().strip()
    if not paused.startswith("PAUSED"):
        trainer.kill()
        pytest.fail("training never reached the step-4 save: " + trainer.communicate()[1][-3000:])
    assert "adapter_model.safetensors" in paused and "optimizer.pt" not in paused  # caught half-way
    trainer.kill()
    trainer.wait()

    out, err = python(RESUME, tmp_path).communicate(timeout=300)
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ", 1)[0] in ("BEFORE", "RESUMED"))
    assert lines.get("BEFORE") == "['checkpoint-2', 'checkpoint-4'] False", out + err[-3000:]  # checkpoint-4 is partial
    assert lines.get("RESUMED") == "2 4", out + err[-3000:]  # resumed from checkpoint-2, not the partial one


def test_disk_full_during_a_checkpoint_save(tmp_path):
    done = subprocess.run([sys.executable, "-c", DISK_FILLS_IN_SAVE, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
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
