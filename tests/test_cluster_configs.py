"""The cluster YAMLs (`ray up`) and the job runtime_env (`ray job submit`) are checked with Ray's own
schema and packaging code, so a typo or a bloated upload fails here rather than on a paid cluster."""

from __future__ import annotations

import copy
import logging
import re
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_FILES = {"aws": REPO_ROOT / "cluster" / "aws-gpu.yaml", "gcp": REPO_ROOT / "cluster" / "gcp-gpu.yaml"}
RUNTIME_ENV_FILE = REPO_ROOT / "cluster" / "runtime_env.yaml"
SCHEMA_FILE = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
IMAGE_TAG = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>cpu|gpu|cu\d+)$")

# Published machine shapes (vCPUs, GPUs) of the instance types the YAMLs use: a node type must
# declare what its machine has, or the autoscaler over- or under-packs it.
MACHINE_SHAPES = {
    "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0), "g6.2xlarge": (8, 1), "g5.2xlarge": (8, 1),
    "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
    "n2-standard-8": (8, 0), "n2-standard-16": (16, 0), "g2-standard-8": (8, 1),
    "a2-highgpu-1g": (12, 1), "a2-highgpu-8g": (96, 8), "a3-highgpu-8g": (208, 8),
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import json

    return json.loads(SCHEMA_FILE.read_text())


@pytest.fixture(params=sorted(CLUSTER_FILES))
def cluster(request) -> tuple[str, dict]:
    return request.param, load(CLUSTER_FILES[request.param])


def machine_type(node_type: dict) -> str:
    cfg = node_type["node_config"]
    return cfg.get("InstanceType") or cfg["machineType"]


def worker_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def gpu_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in worker_types(cfg).items() if MACHINE_SHAPES[machine_type(v)][1] > 0}


# ---------------------------------------------------------------------------------------- cluster YAMLs


def test_cluster_yaml_passes_rays_schema_and_config_checks(cluster, schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    name, cfg = cluster
    jsonschema.validate(cfg, schema)
    # What `ray up` does before touching the cloud: merge the provider defaults, then validate.
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["provider"]["type"] == name
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", [
    ("idle_timeout_minutes",),                               # top level
    ("docker", "container_name"),                            # docker section
    ("available_node_types", "gpu-gen", "min_workers"),      # a node type
    ("available_node_types", "gpu-gen", "docker", "worker_run_options"),  # a node type's docker
])
def test_misspelt_key_is_rejected(cluster, schema, path):
    _, cfg = cluster
    bad = copy.deepcopy(cfg)
    parent = bad
    for key in path[:-1]:
        parent = parent[key]
    typo = path[-1][:-1]  # drop the last letter: idle_timeout_minute, container_nam, ...
    parent[typo] = parent.pop(path[-1])
    with pytest.raises(jsonschema.ValidationError, match=re.escape(typo)):
        jsonschema.validate(bad, schema)


def _images(cfg: dict) -> dict[str, str]:
    """Effective image per node type, the way Ray picks it (type override > worker/head image > image)."""
    docker = cfg["docker"]
    images = {}
    for name, node_type in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            images[name] = docker.get("head_image") or docker["image"]
        else:
            images[name] = (node_type.get("docker", {}).get("worker_image")
                            or docker.get("worker_image") or docker["image"])
    return images


def test_docker_images_use_the_projects_ray_and_one_python(cluster):
    _, cfg = cluster
    all_tags = [cfg["docker"][k] for k in ("image", "head_image", "worker_image") if k in cfg["docker"]]
    all_tags += [t["docker"]["worker_image"] for t in cfg["available_node_types"].values()
                 if "worker_image" in t.get("docker", {})]
    matches = [IMAGE_TAG.match(tag) for tag in all_tags]
    assert all(matches), all_tags
    assert {m["ray"] for m in matches} == {ray.__version__}

    # Every node of a Ray cluster must run the same Python minor version, one the project supports.
    pythons = {m["py"] for m in matches}
    assert len(pythons) == 1, all_tags
    py = pythons.pop()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    requires = re.search(r'requires-python\s*=\s*"([^"]+)"', pyproject).group(1)
    assert f"{py[0]}.{py[1:]}" in SpecifierSet(requires)
    assert re.search(rf'"ray\[[^\]]*\]=={re.escape(ray.__version__)}"', pyproject), "pyproject pins another Ray"

    # GPU nodes get a CUDA image and the GPUs passed into the container; the CPU head gets neither.
    images = _images(cfg)
    for name, node_type in gpu_types(cfg).items():
        assert IMAGE_TAG.match(images[name])["platform"] != "cpu", name
        assert "--gpus all" in node_type["docker"]["worker_run_options"], name
    head_options = cfg["docker"].get("run_options", []) + cfg["docker"].get("head_run_options", [])
    assert not any("--gpus" in opt for opt in head_options)


def test_node_types_declare_their_machines_and_scale_from_zero(cluster):
    _, cfg = cluster
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # nothing but drivers on the head
    assert cfg["idle_timeout_minutes"] > 0

    workers = worker_types(cfg)
    assert set(gpu_types(cfg)) >= {"gpu-gen", "gpu-train"}
    for name, node_type in workers.items():
        assert 0 == node_type["min_workers"] <= node_type["max_workers"] <= cfg["max_workers"], name
        cpus, gpus = MACHINE_SHAPES[machine_type(node_type)]
        assert node_type["resources"].get("CPU") == cpus, name
        assert node_type["resources"].get("GPU", 0) == gpus, name
    assert sum(t["min_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert cfg["max_workers"] >= max(t["max_workers"] for t in workers.values())


def test_file_mounts_install_the_checkout(cluster):
    _, cfg = cluster
    mounts = cfg["file_mounts"]
    project_mounts = {remote: local for remote, local in mounts.items() if not local.startswith("~")}
    for remote, local in project_mounts.items():
        path = (REPO_ROOT / local).resolve()
        assert path.exists(), f"{local} (for {remote}) is not in the checkout"
        # Never the whole checkout: Ray hashes every mounted file on each `ray up` (.venv, .git).
        assert path != REPO_ROOT and not {".git", ".venv"} & set(path.relative_to(REPO_ROOT).parts)

    install = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert len(install) == 1
    target = install[0].split("-e", 1)[1].split()[0]
    # pip needs pyproject.toml, the readme it names, and the package at the install target.
    for needed in ("pyproject.toml", "README.md", "synthfar_ray"):
        assert project_mounts.get(f"{target}/{needed}") == f"./{needed}", needed


def test_ray_runs_with_token_auth_and_storage_credentials(cluster):
    name, cfg = cluster
    for cmd in (cfg["head_start_ray_commands"][-1], cfg["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token ray start" in cmd
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    options = " ".join(cfg["docker"]["run_options"])
    if name == "gcp":
        # Cloud Storage through its S3 API: the endpoint for every process, HMAC keys as AWS creds.
        assert "AWS_ENDPOINT_URL=https://storage.googleapis.com" in options
        assert "/home/ray/.aws/credentials" in cfg["file_mounts"]
    else:
        # S3 through instance profiles: workers name one, and no keys are copied to nodes.
        assert all(t["node_config"]["IamInstanceProfile"] for t in worker_types(cfg).values())
        assert not any(".aws" in remote for remote in cfg["file_mounts"])


# ---------------------------------------------------------------------------------------- runtime_env

# Files a job needs, and files that must never be uploaded with it.
KEPT = ["synthfar_ray/__init__.py", "synthfar_ray/data/vocab.yaml", "workflows/generate.py",
        "configs/generate/quickstart.yaml", "cluster/runtime_env.yaml", "pyproject.toml"]
DROPPED = [".git/objects/ab/cdef", ".venv/lib/python3.11/site.py", "runs/quick/synthetic/part-000000.parquet",
           "runs/quick/train/events.out.tfevents.1.host", "data/utkface/1_0_0_x.jpg",
           "checkpoints/epoch1.pt", "out/shard.parquet", "models/humans.safetensors",
           ".bench/results.json", "synthfar_ray/__pycache__/labels.cpython-311.pyc",
           "synthfar_ray.egg-info/PKG-INFO"]


def runtime_env() -> dict:
    return load(RUNTIME_ENV_FILE)


def package_names(root: Path, tmp_path: Path, excludes: list[str], include_gitignore: bool) -> set[str]:
    """Zip `root` with Ray's own packaging code (what `--working-dir` uploads); the names inside."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / f"pkg-{len(list(tmp_path.iterdir()))}.zip"
    create_package(str(root), target, include_gitignore=include_gitignore, excludes=excludes,
                   logger=logging.getLogger("test.packaging"))
    with zipfile.ZipFile(target) as z:
        return {n.rstrip("/") for n in z.namelist()}


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    data = runtime_env()
    assert set(data) <= {"excludes", "env_vars"}  # RuntimeEnv accepts unknown keys as plugins
    RuntimeEnv(**data)  # type checks env_vars (str -> str) and excludes
    assert data["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"


def test_runtime_env_excludes_drop_outputs_and_keep_sources(tmp_path):
    tree = tmp_path / "repo"
    for rel in KEPT + DROPPED:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"x")
    excludes = runtime_env()["excludes"]
    packed = package_names(tree, tmp_path, excludes, include_gitignore=False)
    assert set(KEPT) <= packed
    assert not set(DROPPED) & packed, sorted(set(DROPPED) & packed)
    # The check bites: without the excludes every one of those files would be uploaded.
    assert set(DROPPED) <= package_names(tree, tmp_path, [], include_gitignore=False)


@pytest.mark.parametrize("ray_defaults", [True, False], ids=["with-ray-defaults", "excludes-alone"])
def test_working_dir_upload_of_this_checkout_is_small(tmp_path, ray_defaults):
    from ray._private.ray_constants import get_runtime_env_default_excludes

    # As `ray job submit --working-dir .` builds it: Ray's default excludes + ours, and .gitignore.
    # Without Ray's defaults (older Ray, or RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES='') ours must
    # still keep .git and .venv out.
    excludes = (get_runtime_env_default_excludes() if ray_defaults else []) + runtime_env()["excludes"]
    names = package_names(REPO_ROOT, tmp_path, excludes, include_gitignore=True)
    size = next(tmp_path.glob("pkg-*.zip")).stat().st_size
    assert size < 10 * 2**20, f"working_dir upload is {size / 2**20:.1f} MiB"
    assert {"synthfar_ray/__init__.py", "cluster/runtime_env.yaml", "pyproject.toml"} <= names
    # The package's own data folder is not the datasets folder that "/data" drops.
    package_data = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "synthfar_ray" / "data").rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts}
    assert package_data and package_data <= names
    top = {n.split("/", 1)[0] for n in names}
    assert not top & {".git", ".venv", "runs", "data", "checkpoints", ".pytest_cache"}, sorted(top)
    assert not any(n.endswith((".parquet", ".pyc", ".pt", ".safetensors")) for n in names)


def _is_spot(node_type: dict) -> bool:
    node_config = node_type["node_config"]
    return (node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or node_config.get("scheduling", {}).get("provisioningModel") == "SPOT")


def test_gpu_types_offer_spot_beside_on_demand(cluster):
    """Generation runs on spot by default (a lost shard is redone); training on demand, with a spot
    type of the same machine beside it, off until max_workers is raised (cluster/README.md)."""
    _, cfg = cluster
    types = cfg["available_node_types"]
    assert _is_spot(types["gpu-gen"]) and not _is_spot(types["gpu-train"])
    spot, on_demand = types["gpu-train-spot"], types["gpu-train"]
    assert _is_spot(spot) and spot["resources"] == on_demand["resources"]
    assert machine_type(spot) == machine_type(on_demand)
    assert spot["max_workers"] == 0 < on_demand["max_workers"]
