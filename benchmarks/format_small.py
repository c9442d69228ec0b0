"""The format stage on a few rows, each in a fresh process (what one `loraflow prepare` pays for it).

    python benchmarks/format_small.py            # 4 instruction rows, 3 fresh processes per way

Compared in one run, on the same 4-row conversations artifact and the default tokenizer (SmolLM2-135M-Instruct):
  (a) auto      the tokenizer loaded through transformers' AutoTokenizer (what load_tokenizer did before
                issue 15): AutoConfig first, which imports torch and the Llama modelling code;
  (b) loraflow  load_tokenizer as it is (a tokenizers-backend folder loads its class directly).
Each run is `run_format` in `python -c`, timed inside the child from before the import of tasks.format to the
written artifact. Writes benchmarks/results/format_small_cpu.json (with the command and date).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import sys, time
started = time.perf_counter()
if sys.argv[1] == "auto":
    import loraflow.modeling.base_model as models
    from transformers import AutoTokenizer
    models.load_tokenizer = lambda model, base_dir=".": AutoTokenizer.from_pretrained(models.resolve_model_dir(model, base_dir))
from loraflow.config.format import FormatConfig
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from tasks.format import run_format
run_format(ArtifactRef.model_validate_json(sys.argv[2]), FormatConfig(), sys.argv[3], ArtifactStore(sys.argv[4]))
print(time.perf_counter() - started, "torch" in sys.modules)
"""


def main(repeats: int = 3) -> dict:
    import pandas as pd

    from loraflow.config.model import ModelConfig
    from loraflow.config.synthesize import SynthesizeConfig
    from loraflow.modeling.base_model import resolve_model_dir
    from loraflow.runtime.artifact_store import ArtifactStore
    from tasks.synthesize import run_synthesize

    folder = Path(tempfile.mkdtemp(prefix="format-small-"))
    store = ArtifactStore(folder / "store")
    rows = pd.read_json(ROOT / "data" / "sample" / "instructions.jsonl", lines=True, dtype=False).head(4)
    rows.insert(0, "_row", range(len(rows)))
    rows.insert(0, "_source", "instructions")
    raw = store.write(rows, stage="ingest", contract="raw", schema_version=1, config_hash="benchmark")
    conversations = run_synthesize([raw], SynthesizeConfig(kind="instruction"), store).output
    model_dir = str(resolve_model_dir(ModelConfig()))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    seconds = {"auto": [], "loraflow": []}
    torch_imported = {}
    for _ in range(repeats):
        for way in seconds:  # interleaved, so machine load hits both ways alike
            out = subprocess.run([sys.executable, "-c", CHILD, way, conversations.model_dump_json(), model_dir, store.root],
                                 env=env, capture_output=True, text=True, check=True).stdout.split()
            seconds[way].append(float(out[-2]))
            torch_imported[way] = out[-1] == "True"
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    result = {
        "command": "python benchmarks/format_small.py",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "rows": len(rows),
        "seconds": seconds, "median_seconds": medians, "torch_imported": torch_imported,
        "ratio_loraflow_to_auto": round(medians["loraflow"] / medians["auto"], 3),
    }
    out_path = ROOT / "benchmarks" / "results" / "format_small_cpu.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
