"""The Kubernetes deployment (prefect.k8s.yaml + k8s/gpu-job-template.json), checked without a cluster.

Prefect's own templating renders the pool's job template with the deployment's job variables, the way a
Kubernetes worker does before it creates the Job; the deployment's parameters validate as a PipelineConfig.
No prefect-kubernetes here (nor a cluster), so the Job is not submitted.
"""

import json
from pathlib import Path

import yaml

from loraflow.config.pipeline import PipelineConfig

REPO = Path(__file__).resolve().parent.parent


def k8s_deployment() -> dict:
    (deployment,) = yaml.safe_load((REPO / "prefect.k8s.yaml").read_text())["deployments"]
    return deployment


def rendered_job(job_variables: dict) -> dict:
    from prefect.utilities.templating import apply_values

    template = json.loads((REPO / "k8s" / "gpu-job-template.json").read_text())
    properties = template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in properties.items() if "default" in spec} | job_variables
    return apply_values(template["job_configuration"], values)


def test_k8s_job_template_declares_every_placeholder_and_job_variable():
    from prefect.utilities.templating import find_placeholders

    template = json.loads((REPO / "k8s" / "gpu-job-template.json").read_text())
    declared = set(template["variables"]["properties"])
    assert {p.name for p in find_placeholders(template["job_configuration"])} <= declared
    assert set(k8s_deployment()["work_pool"]["job_variables"]) <= declared


def test_k8s_pod_requests_the_gpus_with_nvlink_multicast_off_and_the_data_volume():
    deployment = k8s_deployment()
    assert deployment["work_pool"]["name"] == "loraflow-k8s"
    job = rendered_job(deployment["work_pool"]["job_variables"])
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2 == container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["image"] == deployment["work_pool"]["job_variables"]["image"]
    assert {container["env"][k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")} == {"0", "1"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["loraflow-data"]["persistentVolumeClaim"]["claimName"] == "loraflow-data"
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert job["job_manifest"]["spec"]["backoffLimit"] == 0  # a failed pod is not silently re-run by Kubernetes
    # Defaults alone (a run that sets no job variables): one GPU.
    assert rendered_job({"image": "x"})["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_k8s_deployment_runs_the_finetune_flow_with_ddp_on_the_pods_gpus():
    deployment = k8s_deployment()
    module, function = deployment["entrypoint"].split(":")
    assert f"def {function}(" in (REPO / module).read_text()
    config = PipelineConfig(**deployment["parameters"]["config"])
    assert config.train.distributed == "ddp" and config.train.num_processes is None  # every GPU the pod got
    assert config.store.startswith("/var/lib/loraflow/")  # on the mounted volume, shared by the pods
    # prefect.yaml (deployed by `prefect deploy --all` against a local server) names only the process pools.
    local = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in local} == {"loraflow-cpu", "loraflow-gpu"}
