"""The cluster files users deploy with: ray_cluster.yaml (`ray up`) against the cluster-config schema
that ships inside the installed ray package and Ray's own config checks, the AWS bootstrap `ray up`
runs (against moto's EC2) opening no port to the world; the KubeRay RayJob and RayService against
the fields KubeRay requires, Ray's runtime_env and Serve config schemas, and serving.args.ServeArgs."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.conftest import REPO

CLUSTER_YAML = REPO / "ray_cluster.yaml"
KUBERAY = REPO / "cluster" / "kuberay"
OPEN_TO_THE_WORLD = {"0.0.0.0/0", "::/0"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def strings(value) -> list[str]:
    """Every string anywhere inside a parsed YAML document."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings(k) + strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


# ---------------------------------------------------------------- ray_cluster.yaml


def test_ray_cluster_yaml_matches_the_schema_shipped_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load(CLUSTER_YAML)
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs: the provider's defaults filled in, then checked


def test_ray_cluster_yaml_keeps_auth_on_and_the_cluster_closed():
    config = load(CLUSTER_YAML)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "--dashboard-host 127.0.0.1" in head_start  # reached through `ray dashboard ray_cluster.yaml` only
    assert "RAY_AUTH_MODE=token ray start --address" in " ".join(config["worker_start_ray_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token: nodes and clients
    assert not OPEN_TO_THE_WORLD & {s.strip() for s in strings(config)}
    for name, node_type in config["available_node_types"].items():
        # Ray creates a group with SSH open to 0.0.0.0/0 for any node type without its own groups.
        assert node_type["node_config"].get("SecurityGroupIds"), name
    assert config["provider"]["type"] == "aws"


def test_ray_cluster_yaml_has_gpu_workers_bounds_and_installs_the_project():
    config = load(CLUSTER_YAML)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # a CPU head
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpus = {t["node_config"]["InstanceType"].split(".")[0] for t in workers.values()}
    assert {"g6", "p4d"} <= gpus  # L4 and A100 machines
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    assert config["file_mounts"]["~/raydar"] == "."
    setup = " ".join(config["setup_commands"])
    assert "pip install -q -e ~/raydar" in setup  # the ranges of pyproject.toml
    assert not re.search(r"torch\s*==", setup)  # no CPU-only pin: the nodes get PyPI's CUDA build


def test_ray_up_bootstrap_on_aws_opens_no_port_to_the_world(monkeypatch, tmp_path):
    """Ray's own AWS bootstrap (what `ray up` does before launching) against moto's EC2: with our config no
    security group gains an ingress rule from anywhere; without SecurityGroupIds Ray's default one would."""
    import boto3
    from moto import mock_aws
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import prepare_config

    monkeypatch.setenv("HOME", str(tmp_path))  # the key pair Ray makes is written under ~/.ssh
    for key, value in {"AWS_ACCESS_KEY_ID": "raydar-test", "AWS_SECRET_ACCESS_KEY": "raydar-test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    config = prepare_config(load(CLUSTER_YAML))

    def bootstrap(security_group: str | None) -> list[str]:
        c = copy.deepcopy(config)
        head = c["available_node_types"][c["head_node_type"]]["node_config"]
        head["IamInstanceProfile"] = {"Arn": "arn:aws:iam::123456789012:instance-profile/raydar-head"}
        for node_type in c["available_node_types"].values():
            if security_group:
                node_type["node_config"]["SecurityGroupIds"] = [security_group]
            else:
                node_type["node_config"].pop("SecurityGroupIds")
        bootstrap_aws(c)
        groups = boto3.client("ec2").describe_security_groups()["SecurityGroups"]
        return [r["CidrIp"] for g in groups for p in g["IpPermissions"] for r in p.get("IpRanges", [])]

    with mock_aws():  # the group the YAML's comments make: the group itself, SSH from one address
        ec2 = boto3.client("ec2")
        vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
        sg = ec2.create_security_group(GroupName="raydar-cluster", Description="raydar", VpcId=vpc)["GroupId"]
        ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]},
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}])
        assert bootstrap(sg) == ["203.0.113.7/32"]
    with mock_aws():
        assert "0.0.0.0/0" in bootstrap(None)


# ---------------------------------------------------------------- KubeRay


def check_ray_cluster_spec(spec: dict) -> None:
    """What KubeRay's RayCluster CRD requires, plus ours: token auth, images of the Ray we test with."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # no LoadBalancer or NodePort
    groups = [head] + spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", group["groupName"])
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
    for group in groups:
        # map[string]string in the CRD: a number here is rejected by the API server
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        image = containers[0]["image"]
        assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3(1[0-9])(-gpu)?", image), image
        for container in containers:
            assert all("valueFrom" in e for e in container.get("env", [])), "secrets come from Secrets, by name"
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in spec["workerGroupSpecs"]
               for c in g["template"]["spec"]["containers"])


def check_runtime_env(runtime_env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)  # Ray's own validation of each field
    assert runtime_env["working_dir"].endswith(".zip")
    assert any(p.startswith("raydar @ ") and p.endswith(runtime_env["working_dir"]) for p in runtime_env["pip"])


def test_kuberay_rayjob_runs_a_stage_with_auth_on():
    job = load(KUBERAY / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["python", "-m"] and (REPO / (command[2].replace(".", "/") + ".py")).is_file(), command
    assert (REPO / command[command.index("--spec") + 1]).is_file()
    check_runtime_env(yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    assert job["spec"]["metadata"]["project"] == "raydar"  # what `raydar status` lists by
    assert all(isinstance(v, str) for v in job["spec"]["metadata"].values())
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"])


def test_kuberay_rayservice_serves_the_app_builder_with_auth_on():
    from ray.serve.schema import ServeDeploySchema

    from serving.args import ServeArgs

    service = load(KUBERAY / "rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray Serve's own schema of a config file
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serving.app:build_app"
    ServeArgs.model_validate(app["args"])  # the app's own args model: a typo here would fail at deploy
    assert (REPO / app["args"]["spec"]).is_file()
    check_runtime_env(app["runtime_env"])
    check_ray_cluster_spec(service["spec"]["rayClusterConfig"])


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("*.yaml")), ids=lambda p: p.name)
def test_no_secret_value_in_the_manifests(path):
    text = path.read_text()
    assert "kind: Secret" not in text  # Secrets are made with kubectl, never shipped with a value
    assert not re.search(r"(?i)(api_key|token|password)\s*:\s*['\"]?[A-Za-z0-9+/_-]{16,}", text)
