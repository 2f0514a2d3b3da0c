"""deploy/cluster.yaml and deploy/rayservice.yaml: valid as shipped, and consistent with each other.

The RayService is checked against the v1 openAPIV3Schema of KubeRay's CRD (shared/kuberay, next to
the repository), made strict: `additionalProperties: false` is added to every object schema that
lists its properties, so a misspelt field fails here instead of being pruned by Kubernetes.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.config import ClusterConfig, ConfigError
from cluster.serve.app import GRPC_SERVICERS, build_app, deployment_options

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "deploy" / "cluster.yaml"
RAYSERVICE_YAML = ROOT / "deploy" / "rayservice.yaml"
CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# -- cluster.yaml -----------------------------------------------------------------------------


def test_cluster_yaml_is_a_valid_serve_config():
    raw = load_yaml(CLUSTER_YAML)
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "cluster.serve.app:build_app"
    assert app.route_prefix  # the gRPC proxy only routes to applications with a route prefix
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert raw["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICERS
    for servicer in GRPC_SERVICERS:
        module, attr = servicer.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), attr))
    cfg = ClusterConfig.load(app.args)
    assert cfg.ingress.grpc_port == raw["grpc_options"]["port"]
    assert cfg == ClusterConfig.load(None)  # the shipped file spells out the defaults


def test_build_app_rejects_unknown_keys_before_touching_anything():
    args = load_yaml(CLUSTER_YAML)["applications"][0]["args"]
    args["target"]["tp_sise"] = 2
    with pytest.raises(ConfigError, match=r"target\.tp_sise: unknown key"):
        build_app(args)


def test_serve_never_sends_a_target_replica_more_than_its_scheduler_admits():
    cfg = ClusterConfig.load({"limits": {"max_in_flight": 48}})
    assert deployment_options(cfg)["target"]["max_ongoing_requests"] == 48
    cfg = ClusterConfig.load({"limits": {"max_in_flight": 500}})
    assert deployment_options(cfg)["target"]["max_ongoing_requests"] == 256  # its own cap


def test_deployment_options_put_each_kind_on_its_pool():
    cfg = ClusterConfig.load({"target": {"tp_size": 2, "replicas": 2}, "draft": {"replicas": 3}})
    opts = deployment_options(cfg)
    draft = opts["draft"]
    assert draft["num_replicas"] == 3
    assert draft["ray_actor_options"]["resources"] == {"draft_pool": 1.0}
    target = opts["target"]
    assert target["num_replicas"] == 2
    assert target["placement_group_strategy"] == "STRICT_PACK"
    assert target["placement_group_bundles"] == [{"CPU": 1.0, "target_pool": 1.0}] * 2
    assert target["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 0}
    assert all(o["health_check_period_s"] == 2.0 for o in opts.values())
    one = deployment_options(ClusterConfig.load(None))["target"]
    assert "placement_group_bundles" not in one
    assert one["ray_actor_options"]["resources"] == {"target_pool": 1.0}
    gpu = ClusterConfig.load({"target": {"tp_size": 2, "pool": {"resource": "t", "num_gpus": 1}}})
    assert gpu.target.resolved_backend() == "nccl"
    assert deployment_options(gpu)["target"]["placement_group_bundles"][0]["GPU"] == 1.0


# -- rayservice.yaml --------------------------------------------------------------------------


def strict(schema):
    """A copy of an openAPIV3 schema where every object with listed properties forbids others."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def rayservice_schema():
    if not CRD.is_file():
        pytest.skip(f"KubeRay CRD not found at {CRD}")
    crd = load_yaml(CRD)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


def test_rayservice_matches_the_crd_strictly(rayservice_schema):
    manifest = load_yaml(RAYSERVICE_YAML)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    jsonschema.Draft7Validator(rayservice_schema).validate(manifest)


def test_strict_schema_catches_a_misspelt_field(rayservice_schema):
    manifest = load_yaml(RAYSERVICE_YAML)
    group = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        jsonschema.Draft7Validator(rayservice_schema).validate(manifest)


def test_rayservice_embeds_cluster_yaml_and_offers_the_pools():
    manifest = load_yaml(RAYSERVICE_YAML)
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config == load_yaml(CLUSTER_YAML)
    cfg = ClusterConfig.load(serve_config["applications"][0]["args"])
    offered: dict[str, float] = {}
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        # KubeRay passes the value to `ray start --resources`: a quoted JSON object.
        resources = json.loads(json.loads(params["resources"]))
        for name, amount in resources.items():
            offered[name] = offered.get(name, 0) + amount * group["minReplicas"]
    need = cfg.required_resources()
    for pool in (cfg.draft.pool.resource, cfg.target.pool.resource):
        assert offered.get(pool, 0) >= need[pool], pool
    ports = {
        p["containerPort"]
        for p in manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
            "containers"
        ][0]["ports"]
    }
    assert serve_config["grpc_options"]["port"] in ports
