"""configs/gpu_8b.yaml through a real Prefect server and process worker: deployment `finetune-gpu` (issue 31).

    python benchmarks/gpu_worker_run.py --out $OUT --tokenizer-dir .gpu_flow/pack/smollm2 --max-steps 30

What `loraflow server` does, on a GPU host: a local Prefect server, the work pools, `prefect deploy --all`
(prefect.yaml), a process worker on pool `loraflow-gpu`; then one run of `finetune/finetune-gpu` with the config as
its parameter (the catalog and the 8B stand-in made first, as benchmarks/gpu_flow.py makes them). The run happens
in the worker's child process, so memory is sampled from outside: the host RSS of the worker's process tree
(psutil) and the GPU's used memory (NVML: the process's allocations plus the CUDA context, so above the
allocator's figures in gpu_flow.json), every 0.5 s into a timeline. Each task run's start and end (read back
from the server) cut that timeline into per-stage wall time and peaks; train's tokens/s and time to its first
step, evaluation's and publish's step timings come from the run's summary.json. Writes gpu_worker_run.json and
gpu_worker_timeline.json (unix time, tree RSS GiB, GPU used GiB per sample).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_flow import gib, run_config, summarise_flow, versions  # noqa: E402


class TreeSampler(threading.Thread):
    """Peak RSS of a process and its descendants, and peak GPU memory used (NVML), every `period` s."""

    def __init__(self, pid: int, period: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.period, self.stopped = pid, period, threading.Event()
        self.peak_rss, self.peak_gpu_used, self.samples = 0, 0, []

    def run(self):
        import psutil

        try:
            import pynvml

            pynvml.nvmlInit()
            device = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML (a CPU dry run): host memory only
            pynvml = device = None
        root = psutil.Process(self.pid)
        while not self.stopped.is_set():
            rss = 0
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())
            except psutil.Error:
                pass
            used = pynvml.nvmlDeviceGetMemoryInfo(device).used if device is not None else 0
            self.peak_rss, self.peak_gpu_used = max(self.peak_rss, rss), max(self.peak_gpu_used, used)
            self.samples.append((round(time.time(), 2), rss, used))
            self.stopped.wait(self.period)

    def window(self, start: float, end: float) -> dict:
        """Peak tree RSS and GPU used (GiB) among the samples taken from `start` to `end` (unix seconds)."""
        inside = [(rss, used) for t, rss, used in self.samples if start <= t <= end] or [(0, 0)]
        return {"rss_peak_gib": gib(max(r for r, _ in inside)), "gpu_used_peak_gib": gib(max(u for _, u in inside))}


def stage_windows(client, flow_run_id, sampler: TreeSampler) -> list[dict]:
    """Every task run of the flow run, in start order: name, start (s after the flow run's start), seconds, and the
    sampler's peaks within it."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run = client.read_flow_run(flow_run_id)
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    origin = flow_run.start_time.timestamp() if flow_run.start_time else 0
    stages = []
    for task in sorted((t for t in tasks if t.start_time), key=lambda t: t.start_time):
        start, end = task.start_time.timestamp(), (task.end_time or task.start_time).timestamp()
        stages.append({"stage": task.name, "state": task.state.type.value if task.state else None,
                       "start_s": round(start - origin, 1), "seconds": round(end - start, 1), **sampler.window(start, end)})
    return stages


def run_on_worker(local, parameters: dict, timeout: float) -> tuple[dict, float, TreeSampler]:
    """Create a run of finetune/finetune-gpu and wait for a final state; ({state, message, stages, pickup_s},
    seconds, sampler)."""
    from loraflow.ops.server import GPU_POOL

    worker = local.start_worker(GPU_POOL)
    sampler = TreeSampler(worker.pid)
    sampler.start()
    started = time.perf_counter()
    with local.client() as client:
        deployment = client.read_deployment_by_name("finetune/finetune-gpu")
        run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        while time.perf_counter() - started < timeout:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            time.sleep(2)
        sampler.stopped.set()
        state = {"type": run.state.type.value if run.state else None, "message": run.state.message if run.state else None,
                 "stages": stage_windows(client, run.id, sampler),
                 "pickup_s": round(run.start_time.timestamp() - run.created.timestamp(), 1) if run.start_time else None}
    return state, time.perf_counter() - started, sampler


def main() -> int:
    """Command line: inputs, server + pools + deploy + worker, one run, the JSON."""
    from loraflow.config.pipeline import load_config
    from loraflow.ops.server import LocalPrefect
    from scripts.make_8b_model import build, default_tokenizer_dir
    from scripts.make_sample_data import write_catalog

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir", default=str(ROOT / ".loraflow" / "gpu_8b_worker"))
    parser.add_argument("--tokenizer-dir", default=None)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--catalog", type=int, default=5000)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--questions", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=480)
    args = parser.parse_args()
    out, data_dir = Path(args.out), Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/gpu_worker_run.py " + " ".join(sys.argv[1:]), "versions": versions(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    started = time.perf_counter()
    write_catalog(data_dir, args.catalog)
    build(data_dir / "model", Path(args.tokenizer_dir) if args.tokenizer_dir else default_tokenizer_dir(), args.layers, args.hidden)
    config = load_config(run_config(data_dir, max_steps=args.max_steps, questions=args.questions))
    result["inputs_s"] = round(time.perf_counter() - started, 1)
    local = LocalPrefect(port=4300, home=data_dir / "prefect-home", log_dir=out / "prefect")
    try:
        with local:
            result["server_healthy_s"] = round(time.perf_counter() - started - result["inputs_s"], 1)
            local.ensure_pools()
            deployed = local.prefect("deploy", "--all", check=False)
            result["deploy"] = {"returncode": deployed.returncode, "tail": (deployed.stdout + deployed.stderr)[-1500:]}
            run, seconds, sampler = run_on_worker(local, {"config": config.model_dump(mode="json")}, args.timeout)
            result |= {"state": run["type"], "state_message": run["message"], "pickup_s": run["pickup_s"],
                       "run_wall_s": round(seconds, 1), "worker_tree_rss_peak_gib": gib(sampler.peak_rss),
                       "gpu_used_peak_gib": gib(sampler.peak_gpu_used), "stages": run["stages"]}
            (out / "gpu_worker_timeline.json").write_text(json.dumps(
                [(t, gib(rss), gib(used)) for t, rss, used in sampler.samples]))
        summaries = sorted((data_dir / "runs").glob("*/*/summary.json"), key=lambda p: p.stat().st_mtime)
        if summaries:
            result["flow"] = summarise_flow(json.loads(summaries[-1].read_text()))
    finally:
        result["wall_s"] = round(time.perf_counter() - started, 1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_worker_run.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions", "flow", "deploy")}))
    return 0 if result.get("state") == "COMPLETED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
