"""deploy/k8s: every manifest validates offline against the Kubernetes schemas (strict: an
unknown or misspelt field fails), the PyTorchJob against the kubeflow.org/v1 fields the
training-operator defines and requires, and the pieces fit together: the command each pod runs
is one `elastic-run` accepts (with the PET_* variables the operator would set), and it reaches
the etcd Service of etcd.yaml.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from elastic.launcher.cli import build_parser, config_from_args
from helpers import REPO

K8S = Path(REPO) / "deploy" / "k8s"
KUBERNETES = "1.29"  # the oldest release still common in managed clusters; schemas ship offline

# The PyTorchJob fields of the training-operator's kubeflow.org/v1 API (PyTorchJobSpec,
# ElasticPolicy, RunPolicy, ReplicaSpec); the pod template inside is a core PodTemplateSpec,
# validated with the Kubernetes schema.
_INT = {"type": "integer", "minimum": 0}
PYTORCHJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["pytorchReplicaSpecs"],
            "properties": {
                "nprocPerNode": {"type": "string"},
                "runPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                        "backoffLimit": _INT, "activeDeadlineSeconds": _INT,
                        "ttlSecondsAfterFinished": _INT, "suspend": {"type": "boolean"},
                        "schedulingPolicy": {"type": "object"}, "managedBy": {"type": "string"},
                    },
                },
                "elasticPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "minReplicas": _INT, "maxReplicas": _INT, "maxRestarts": _INT,
                        "nProcPerNode": _INT, "rdzvPort": _INT, "rdzvHost": {"type": "string"},
                        "rdzvId": {"type": "string"}, "standalone": {"type": "boolean"},
                        "rdzvBackend": {"enum": ["c10d", "etcd", "etcd-v2"]},
                        "rdzvConf": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"key": {"type": "string"}, "value": {"type": "string"}}}},
                        "metrics": {"type": "array"},
                    },
                },
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": {"enum": ["Master", "Worker"]},
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["template"],
                        "properties": {
                            "replicas": _INT,
                            "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
                            "template": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def validate_core(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def validate_pytorchjob(doc: dict) -> None:
    jsonschema.validate(doc, PYTORCHJOB_SCHEMA)
    for rtype, replica in doc["spec"]["pytorchReplicaSpecs"].items():
        name = f"{doc['metadata']['name']}-{rtype.lower()}"
        validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                       "template": replica["template"]})
        names = [c["name"] for c in replica["template"]["spec"]["containers"]]
        assert "pytorch" in names, f"{rtype}: the operator needs a container named 'pytorch', has {names}"
    if doc["spec"]["pytorchReplicaSpecs"].get("Master", {}).get("replicas", 1) != 1:
        raise AssertionError("the operator allows exactly one Master replica")


def operator_env(job: dict) -> dict[str, str]:
    """The PET_* variables the training-operator gives each pod of an elastic PyTorchJob."""
    policy = job["spec"]["elasticPolicy"]
    env = {"PET_RDZV_BACKEND": policy.get("rdzvBackend", "c10d"),
           "PET_RDZV_ENDPOINT": f"{policy['rdzvHost']}:{policy['rdzvPort']}",
           "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}"}
    if "maxRestarts" in policy:
        env["PET_MAX_RESTARTS"] = str(policy["maxRestarts"])
    if "rdzvId" in policy:
        env["PET_RDZV_ID"] = policy["rdzvId"]
    if "rdzvConf" in policy:
        env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in policy["rdzvConf"])
    return env


def elastic_run_config(container: dict, env: dict[str, str], monkeypatch, workdir: Path):
    """What `elastic-run` makes of the container's command line, $(VAR)s expanded as the kubelet
    does, with `env` (PET_* defaults) in its environment, run where the image has the script."""
    assert container["command"] == ["elastic-run"], container["command"]
    (workdir / container["args"][-1]).write_text("")
    monkeypatch.chdir(workdir)
    for name in [n for n in os.environ if n.startswith("PET_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m[1]], a) for a in container["args"]]
    return config_from_args(build_parser().parse_args(args))


def etcd_client_endpoint() -> str:
    """HOST:PORT of etcd.yaml's client Service, as pods in the namespace reach it."""
    (svc,) = [s for s in by_kind(manifests("etcd.yaml"), "Service") if s["spec"].get("clusterIP") != "None"]
    (port,) = [p["port"] for p in svc["spec"]["ports"] if p["name"] == "client"]
    return f"{svc['metadata']['name']}:{port}"


@pytest.mark.parametrize("name", ["etcd.yaml", "indexed-job.yaml"])
def test_core_manifests_validate_strictly(name):
    docs = manifests(name)
    assert docs
    for doc in docs:
        validate_core(doc)


def test_a_misspelt_or_mistyped_field_fails_validation():
    job = copy.deepcopy(manifests("indexed-job.yaml")[0])
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(job)
    bad = copy.deepcopy(manifests("pytorchjob.yaml")[0])
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError):
        validate_pytorchjob(bad)
    bad = copy.deepcopy(manifests("pytorchjob.yaml")[0])
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"] = "train.py"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pytorchjob(bad)


def test_etcd_statefulset_members_match_its_services():
    docs = manifests("etcd.yaml")
    (sts,) = by_kind(docs, "StatefulSet")
    (headless,) = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for selector in [s["spec"]["selector"] for s in by_kind(docs, "Service")] + \
            [d["spec"]["selector"]["matchLabels"] for d in by_kind(docs, "PodDisruptionBudget")]:
        assert selector.items() <= labels.items()
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    (args,) = [c["args"] for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "etcd"]
    (cluster,) = [a.split("=", 1)[1] for a in args if a.startswith("--initial-cluster=")]
    name, svc = sts["metadata"]["name"], headless["metadata"]["name"]
    assert cluster.split(",") == [f"{name}-{i}=http://{name}-{i}.{svc}:2380" for i in range(sts["spec"]["replicas"])]
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == sts["spec"]["replicas"] // 2 + 1  # a quorum survives a drain


def test_indexed_job_runs_one_agent_per_pod_against_the_etcd_service(monkeypatch, tmp_path):
    (job,) = manifests("indexed-job.yaml")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    (container,) = spec["template"]["spec"]["containers"]
    env = {"NODE_INDEX": "1", "JOB_UID": "0b5f3c1e-uid"}
    config = elastic_run_config(container, env, monkeypatch, tmp_path)
    assert config.rdzv_endpoint == etcd_client_endpoint()
    assert config.run_id == "0b5f3c1e-uid" and config.node_id == "node-1"
    assert config.max_nodes == spec["parallelism"] and 1 <= config.min_nodes <= config.max_nodes
    assert config.nproc_per_node == container["resources"]["limits"]["nvidia.com/gpu"]
    assert config.checkpoint_dir.startswith(container["volumeMounts"][0]["mountPath"] + "/")


def test_pytorchjob_validates_and_its_policy_reaches_elastic_run(monkeypatch, tmp_path):
    (job,) = manifests("pytorchjob.yaml")
    validate_pytorchjob(job)
    policy, worker = job["spec"]["elasticPolicy"], job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert policy["minReplicas"] <= worker["replicas"] <= policy["maxReplicas"]
    (container,) = worker["template"]["spec"]["containers"]
    config = elastic_run_config(container, operator_env(job), monkeypatch, tmp_path)
    assert config.rdzv_endpoint == etcd_client_endpoint()
    assert (config.min_nodes, config.max_nodes) == (policy["minReplicas"], policy["maxReplicas"])
    assert config.max_restarts == policy["maxRestarts"] and config.run_id == policy["rdzvId"]
    assert config.nproc_per_node == container["resources"]["limits"]["nvidia.com/gpu"]
