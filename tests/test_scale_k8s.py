"""infra/k8s/gpu-work-pool.json rendered by prefect-kubernetes' own worker code.

The server's work-pool validation and the Kubernetes worker's job configuration turn the base
job template plus a deployment's job variables into the Job manifest the worker would submit;
a template the integration cannot render (or one that lost its GPU, image, env or volume)
fails here instead of on a cluster.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import WorkPoolCreate
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "k8s" / "gpu-work-pool.json"


class NoApi:
    """Stands in for the Prefect API client: rendering looks up block documents and variables
    through it only when the template references some, which this one must not (a worker on a
    cluster would need them to exist). Any use fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the template needs the Prefect API ({name}): it references blocks or variables")


def _render(template: dict, values: dict) -> dict:
    WorkPoolCreate(name="l3m-gpu", type=KubernetesWorker.type, base_job_template=template)  # server-side check
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=NoApi()))
    run = FlowRun(id=uuid4(), name="brave-otter", flow_id=uuid4(), parameters={"config": "domains/chemprot.yaml"})
    config.prepare_for_flow_run(run)
    return config.job_manifest


def _container(manifest: dict) -> dict:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return container


def test_defaults_render_a_gpu_job_with_image_env_and_the_shared_volume():
    template = json.loads(TEMPLATE.read_text())
    manifest = _render(template, {})
    assert manifest["kind"] == "Job" and manifest["metadata"]["namespace"] == "l3m"
    pod = manifest["spec"]["template"]["spec"]
    c = _container(manifest)
    assert c["image"] == "registry.example.com/l3m-worker-cuda:latest"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    # The shared volume holds the output root (score store inside) and the BentoML store.
    assert env["L3M_OUTPUT_ROOT"] == "/data/runs" and env["BENTOML_HOME"] == "/data/bentoml"
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/data/")  # the registration cache
    assert env["PREFECT__FLOW_RUN_ID"]  # the worker's own variables reach the pod
    assert c["volumeMounts"] == [{"name": "l3m-data", "mountPath": "/data"}]
    assert pod["volumes"] == [{"name": "l3m-data", "persistentVolumeClaim": {"claimName": "l3m-data"}}]
    assert "prefect" in " ".join(c["args"]) and manifest["metadata"]["generateName"].startswith("brave-otter")


def test_job_variables_override_gpus_image_memory_and_claim():
    template = json.loads(TEMPLATE.read_text())
    manifest = _render(template, {"gpus": 4, "image": "reg.local/l3m:cuda", "memory": "64Gi", "data_pvc": "team-nfs",
                                  "env": {"HF_HUB_OFFLINE": "1"}})
    c = _container(manifest)
    assert c["image"] == "reg.local/l3m:cuda"
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 4, "memory": "64Gi", "cpu": "8"}
    assert manifest["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "team-nfs"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]


def test_a_template_using_an_undeclared_variable_is_refused():
    template = json.loads(TEMPLATE.read_text())
    broken = copy.deepcopy(template)
    limits = broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["nvidia.com/gpu"] = "{{ gpu_count }}"
    with pytest.raises(ValueError, match="gpu_count"):
        _render(broken, {})


def test_a_template_without_containers_is_refused_by_the_worker():
    broken = json.loads(TEMPLATE.read_text())
    del broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    with pytest.raises(ValueError, match="containers"):
        _render(broken, {})
