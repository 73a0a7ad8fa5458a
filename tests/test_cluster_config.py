"""cluster/: the launcher YAML, the KubeRay manifests, the runtime_env and the job specs they
name are checked against what Ray, KubeRay and our own specs accept, and against each other
(a spec must fit the node group it is sized for)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.specs import CaptionSpec, EvaluateSpec, FinetuneSpec, load_spec

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws" / "trol-ray.yaml"
SPEC_CLASSES = {"caption": CaptionSpec, "finetune": FinetuneSpec, "evaluate": EvaluateSpec}
CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def ray_cluster_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def load_launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def kuberay_documents() -> list[dict]:
    docs = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def only(kind: str) -> list[dict]:
    return [d for d in kuberay_documents() if d["kind"] == kind]


def validate_launcher(config: dict) -> None:
    """Ray's JSON schema, then the checks `ray up` adds after filling in its defaults."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, ray_cluster_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


# --- the Ray cluster launcher (AWS) -----------------------------------------------------------

def test_launcher_yaml_validates_against_rays_own_schema():
    validate_launcher(load_launcher())


def test_launcher_schema_check_rejects_a_misspelled_field():
    config = load_launcher()
    config["available_node_types"]["caption_l4"]["max_worker"] = 4  # typo of max_workers
    with pytest.raises(Exception, match="max_worker"):
        validate_launcher(config)


def test_launcher_has_a_cpu_head_and_the_two_gpu_groups():
    config = load_launcher()
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["caption_l4"]["resources"]["GPU"] == 1 and types["train_8gpu"]["resources"]["GPU"] == 8
    for name in ("caption_l4", "train_8gpu"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())


def test_launcher_installs_cuda_torch_then_flash_attn_then_the_gpu_extra():
    config = load_launcher()
    worker_commands = config["setup_commands"] + config["worker_setup_commands"]  # the order `ray up` runs them
    torch_at = next(i for i, c in enumerate(worker_commands) if re.search(r"pip install .*\btorch==", c))
    flash_at = next(i for i, c in enumerate(worker_commands) if "flash-attn" in c)
    extra_at = next(i for i, c in enumerate(worker_commands) if "[gpu]" in c)
    assert torch_at < flash_at < extra_at
    assert "--no-build-isolation" in worker_commands[flash_at]
    assert "download.pytorch.org/whl/cpu" not in " ".join(worker_commands)  # GPU nodes need the CUDA build
    assert not any("[gpu]" in c or "flash-attn" in c for c in config["setup_commands"] + config.get(
        "head_setup_commands", [])), "the CPU head cannot build flash-attn"


def test_launcher_gets_s3_from_instance_profiles_and_starts_ray_with_the_venv_and_a_token():
    config = load_launcher()
    for name, node_type in config["available_node_types"].items():
        assert "Arn" in node_type["node_config"].get("IamInstanceProfile", {}), f"{name}: no instance profile"
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and starts.count("trol-venv/bin:$PATH") == 2
    assert "--dashboard-host=127.0.0.1" in starts
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_no_credentials_anywhere_in_cluster_files():
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path}: an AWS access key id"
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", text), \
            f"{path}: a secret key value"


# --- KubeRay ---------------------------------------------------------------------------------

def pod_specs(cluster: dict) -> dict[str, dict]:
    spec = cluster["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def test_raycluster_carries_what_kuberay_requires():
    import ray

    (cluster,) = only("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__, "rayVersion must match the Ray the project pins"
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus = {}
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"], group["groupName"]
        gpus[group["groupName"]] = limits["nvidia.com/gpu"]
    assert gpus == {"caption-l4": 1, "train-8gpu": 8}
    for name, pod in pod_specs(cluster).items():
        for container in pod["containers"]:
            assert container["image"], name


def test_kuberay_credentials_come_from_a_secret_or_the_service_account():
    (cluster,) = only("RayCluster")
    (account,) = only("ServiceAccount")
    for name, pod in pod_specs(cluster).items():
        assert pod["serviceAccountName"] == account["metadata"]["name"], name
        for container in pod["containers"]:
            for var in container.get("env", []):
                if var["name"] in CREDENTIAL_VARS:
                    assert "value" not in var, f"{name}: {var['name']} written inline"
                    assert var["valueFrom"]["secretKeyRef"]["name"], name
    for job in only("RayJob"):
        env_vars = yaml.safe_load(job["spec"]["runtimeEnvYAML"]).get("env_vars", {})
        assert not CREDENTIAL_VARS & set(env_vars), f"{job['metadata']['name']}: credentials in runtime_env"


@pytest.mark.parametrize("job_name", ["trol-caption", "trol-finetune"])
def test_rayjob_entrypoint_names_a_module_and_a_spec_that_validate(job_name):
    from ray.runtime_env import RuntimeEnv

    (cluster,) = only("RayCluster")
    (job,) = [j for j in only("RayJob") if j["metadata"]["name"] == job_name]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))  # Ray's own runtime_env validation

    python, dash_m, module, spec_path, *options = shlex.split(job["spec"]["entrypoint"])
    assert (python, dash_m) == ("python", "-m") and module.startswith("jobs.")
    assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
    # The spec is a file of cluster/specs/, mounted on the head (where drivers run) by ConfigMap.
    head = pod_specs(cluster)["head"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volume = next(v for v in head["volumes"] if v["name"] == "job-specs")
    assert volume["configMap"]["name"] == "trol-job-specs" and mounts["job-specs"] == str(Path(spec_path).parent)
    local_spec = CLUSTER / "specs" / Path(spec_path).name
    kind = module.removeprefix("jobs.")
    overrides = [options[i + 1] for i, o in enumerate(options) if o == "--set"]
    load_spec(SPEC_CLASSES[kind], local_spec, overrides)
    if kind == "caption":
        from jobs.caption import parse_args

        parse_args([str(local_spec), *options])


# --- specs and runtime_env ---------------------------------------------------------------------

SPEC_FILES = sorted([*(REPO / "jobs" / "examples").glob("*.yaml"), *(CLUSTER / "specs").glob("*.yaml")])


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_spec_validates(path):
    kind = path.name.split("_")[0]
    assert kind in SPEC_CLASSES, f"{path.name}: name it caption_*.yaml, finetune_*.yaml or evaluate_*.yaml"
    load_spec(SPEC_CLASSES[kind], path)


def test_specs_fit_the_node_groups_they_are_sized_for():
    launcher = load_launcher()["available_node_types"]
    (cluster,) = only("RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}

    caption = load_spec(CaptionSpec, CLUSTER / "specs" / "caption_l4.yaml")
    node = launcher["caption_l4"]["resources"]
    assert caption.gpus_per_actor <= node["GPU"] and caption.cpus_per_actor < node["CPU"]  # CPUs left to decode
    most = caption.concurrency if isinstance(caption.concurrency, int) else caption.concurrency[1]
    assert most <= launcher["caption_l4"]["max_workers"] * node["GPU"]  # the pool's largest size fits the group
    assert most <= groups["caption-l4"]["maxReplicas"]

    finetune = load_spec(FinetuneSpec, CLUSTER / "specs" / "finetune_h100.yaml")
    node = launcher["train_8gpu"]["resources"]
    assert finetune.gpus_per_worker == 1 and finetune.workers % node["GPU"] == 0  # whole nodes
    assert finetune.workers <= launcher["train_8gpu"]["max_workers"] * node["GPU"]
    assert finetune.workers <= groups["train-8gpu"]["maxReplicas"] * 8
    from pipelines.finetune import worker_resources

    # Each worker's bundle holds its data tasks' CPUs too: 8 bundles must fit one node.
    assert worker_resources(finetune)["CPU"] * node["GPU"] <= node["CPU"]


def test_runtime_env_file_is_valid_and_keeps_the_venv_out_of_uploads():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**data)
    assert {".venv", ".git"} <= set(data["excludes"])
    assert not CREDENTIAL_VARS & set(data.get("env_vars", {}))


def test_dockerfile_installs_flash_attn_after_torch_without_build_isolation():
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in text
    installs = [line for line in text.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    torch_at = next(i for i, line in enumerate(installs) if "torch==" in line)
    flash_at = next(i for i, line in enumerate(installs) if "flash-attn" in line)
    extra_at = next(i for i, line in enumerate(installs) if '".[gpu]"' in line)
    assert torch_at < flash_at < extra_at and "--no-build-isolation" in installs[flash_at]


def test_readmes_link_the_cluster_guide_and_it_covers_every_cluster_file():
    assert "cluster/README.md" in (REPO / "README.md").read_text()
    guide = (CLUSTER / "README.md").read_text()
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.name != "README.md"):
        assert str(path.relative_to(REPO)) in guide, f"cluster/README.md does not mention {path.relative_to(REPO)}"
