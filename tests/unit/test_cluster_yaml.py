"""``cluster.yaml`` is a valid Ray cluster-launcher config (checked against Ray's own schema)."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_matches_the_ray_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_never_uses_the_redis_port():
    text = (ROOT / "cluster.yaml").read_text()
    assert "--port=6380" in text and "6379" not in text.replace("never 6379", "")


def test_every_ray_start_uses_the_default_serve_ingress():
    from mass.settings import SERVE_INGRESS_ENV, VARIABLES

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    wanted = SERVE_INGRESS_ENV[VARIABLES["MASS_SERVE_INGRESS"][0]]
    assert len(starts) == 2 and wanted
    for command in starts:
        assert all(f"{key}={value}" in command for key, value in wanted.items()), command
