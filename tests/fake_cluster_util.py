"""A fake multi-node Ray cluster made from a shipped cluster YAML, driven by Ray's real autoscaler.

    with fake_cluster(REPO_ROOT / "cluster/aws-gpu.yaml", env=moto_env) as cluster:
        result = cluster.submit(["python", "workflows/generate.py", ...], timeout=300)
        cluster.wait_for(lambda nodes: ..., timeout=60, what="...")

Ray's `fake_multinode` provider launches each "node" as local Ray processes with the resources its
node type declares. The autoscaler is Ray's own (v1, the one `ray up` runs), reading a config derived
from the YAML:
- the same worker node type names, min_workers and resource kinds; amounts scaled down to fit this
  2-core machine (`scale_resources`): GPUs stay declared resources, the work itself runs on CPU;
- max_workers capped at 2 per type (enough to show scale-up and a replacement after a loss);
- the head keeps the YAML's resources (CPU: 0, so it only runs drivers) but is named
  `ray.head.default`: the fake provider tags its head with that name, whatever the config says;
- idle_timeout_minutes shortened so scale-down is seen within a test.

`ray.cluster_utils.AutoscalingCluster` is not used: it needs a YAML the wheel lacks and its shutdown
runs `ray stop --force`, which kills every Ray process on the machine. As in job_submit_util, the
head runs as `ray start --head --block` in its own process group and temp dir. Every process of the
cluster carries a marker variable in its environment, so teardown (and `kill_node`, which plays a
spot preemption: SIGKILL to one node's processes) finds exactly this cluster's processes.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from job_submit_util import (
    HEAD_STARTUP_TIMEOUT_S, REPO_ROOT, JobResult, _stop, _tail, free_port, head_diagnostics, head_environment,
    ray_executable, start_head, submit_job,
)

FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's fixed name for the head's node type
MARKER = "SYNTHFAR_FAKE_CLUSTER"
OBJECT_STORE_BYTES = 160 * 2**20  # per fake node; the default (30 % of RAM each) would not fit several
# Ray Data's own cluster autoscaler asks for more nodes whenever its tasks keep the CPUs busy (it
# doubles what the dataset uses). On a real cluster that feeds a GPU; here every fake node is several
# more processes on the same 2 cores, and a training run's reads took the cluster to every type's
# max_workers and starved the work itself (a node-loss sweep crawled for minutes). A utilisation
# threshold above 1 is never reached, so Ray Data asks for nothing; the jobs' own requests (actors,
# Train workers, trials) still drive the autoscaler, which is what these tests are about.
RAY_DATA_NO_SCALE_UP = {f"RAY_DATA_DEFAULT_CLUSTER_SCALING_UP_{kind}_UTIL_THRESHOLD": "1.5"
                        for kind in ("CPU", "GPU", "MEMORY", "OBJECT_STORE_MEMORY")}


def scale_resources(resources: dict) -> dict:
    """A node type's resources cut to fit 2 cores: at most 2 CPUs and 2 GPUs, other kinds kept. The
    shipped configs' largest requests (2 CPUs per diffusion actor, 1 GPU per actor or Train worker)
    still fit the types they fit at full size."""
    out = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    if "CPU" in resources:
        out["CPU"] = min(float(resources["CPU"]), 2.0)
    if resources.get("GPU"):
        out["GPU"] = min(float(resources["GPU"]), 2.0)
    return {k: (int(v) if float(v).is_integer() else v) for k, v in out.items()}


def fake_config(yaml_path: Path, gcs_port: int, idle_timeout_minutes: float = 0.25, max_workers: int = 2) -> dict:
    src = yaml.safe_load(Path(yaml_path).read_text())
    head = src["head_node_type"]
    types: dict[str, dict] = {}
    for name, spec in src["available_node_types"].items():
        res = scale_resources(spec.get("resources") or {})
        if name == head:
            types[FAKE_HEAD_TYPE] = {"resources": res, "node_config": {}, "max_workers": 0}
        else:
            types[name] = {"resources": {**res, "object_store_memory": OBJECT_STORE_BYTES}, "node_config": {},
                           "min_workers": int(spec.get("min_workers", 0)),
                           "max_workers": min(int(spec.get("max_workers", 0)), max_workers)}
    empty: list = []
    return {
        "cluster_name": f"fake-{src['cluster_name']}",
        "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "upscaling_speed": src.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"},
        "head_node_type": FAKE_HEAD_TYPE,
        "available_node_types": types,
        "file_mounts": {}, "cluster_synced_files": empty, "file_mounts_sync_continuously": False,
        "rsync_exclude": empty, "rsync_filter": empty, "initialization_commands": empty, "setup_commands": empty,
        "head_setup_commands": empty, "worker_setup_commands": empty, "head_start_ray_commands": empty,
        "worker_start_ray_commands": empty,
    }


@dataclass
class Node:
    node_id: str
    alive: bool
    resources: dict
    is_head: bool


@dataclass
class FakeCluster:
    address: str  # dashboard URL (jobs API)
    gcs: str
    env: dict[str, str]
    temp_dir: Path
    config: dict
    marker: str
    process: subprocess.Popen = field(repr=False)
    log_file: Path = field(repr=False)

    def submit(self, entrypoint: list[str], timeout: float = 300) -> JobResult:
        """`ray job submit` without --working-dir: every fake node runs the checkout's installed code,
        as nodes that the YAML's setup_commands installed the project on do. (With --working-dir,
        each fake node's runtime-env agent would unpack the upload into the one session folder the
        nodes share, pulling it from under the other nodes' workers.)"""
        try:
            return submit_job(self.address, entrypoint, timeout, env=self.env, working_dir=None)
        except Exception as e:  # as LocalHead.submit: the error carries the head's logs
            raise RuntimeError(f"{e}\n\n--- head diagnostics ---\n{head_diagnostics(self.process, self.log_file, self.temp_dir)}") from e

    def nodes(self) -> list[Node]:
        """Every node the GCS knows, from the dashboard's state API (this process stays off the cluster:
        it may be connected to the test session's own Ray)."""
        rows = self.state("nodes")
        return [Node(r["node_id"], r["state"] == "ALIVE", r.get("resources_total") or {}, bool(r.get("is_head_node")))
                for r in rows]

    def state(self, kind: str) -> list[dict]:
        """Rows of the dashboard's state API (`nodes`, `actors`, ...) for this cluster."""
        request = urllib.request.Request(f"{self.address}/api/v0/{kind}?limit=10000&detail=1",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["data"]["result"]["result"]

    def alive_workers(self) -> list[Node]:
        return [n for n in self.nodes() if n.alive and not n.is_head]

    def wait_for(self, predicate: Callable[[list[Node]], bool], timeout: float, what: str) -> list[Node]:
        deadline = time.monotonic() + timeout
        nodes: list[Node] = []
        while time.monotonic() < deadline:
            nodes = self.alive_workers()
            if predicate(nodes):
                return nodes
            time.sleep(1)
        raise TimeoutError(f"{what}: not within {timeout:.0f} s; live workers: "
                           f"{[(n.node_id[-5:], n.resources) for n in nodes]}\n{self.monitor_log()}")

    def kill_node(self, node_id: str) -> int:
        """SIGKILL every process of one worker node (a spot preemption: no drain, no notice).
        Returns how many processes were killed."""
        return _sigkill(pid for pid, env in _cluster_processes(self.marker)
                        if env.get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id)

    def monitor_log(self, chars: int = 3000) -> str:
        return "== monitor.log\n" + _tail(self.temp_dir / "session_latest" / "logs" / "monitor.log", chars)


def _cluster_processes(marker: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(pid, environment) of this machine's processes whose environment carries `marker`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARKER}={marker}".encode() not in raw:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        yield int(entry.name), env


def _sigkill(pids: Iterable[int]) -> int:
    """SIGKILL each pid (gone ones skipped); how many were signalled."""
    killed = 0
    for pid in list(pids):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


@contextmanager
def fake_cluster(yaml_path: Path, env: dict[str, str] | None = None, startup_timeout: float = HEAD_STARTUP_TIMEOUT_S,
                 idle_timeout_minutes: float = 0.25) -> Iterator[FakeCluster]:
    """Start a head with the autoscaler and the fake provider; tear down every process it made."""
    temp_dir = Path(tempfile.mkdtemp(prefix="sfr-fake-", dir="/tmp"))
    token, marker = secrets.token_hex(32), uuid.uuid4().hex
    gcs_port, dash_port = free_port(), free_port()
    config = fake_config(yaml_path, gcs_port, idle_timeout_minutes)
    config_path = temp_dir / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head_res = dict(config["available_node_types"][FAKE_HEAD_TYPE]["resources"])
    full_env = head_environment(token)
    full_env.update(env or {})
    # The state API finds its cluster by looking for GCS processes on the machine; beside the test
    # session's own Ray there are two, and Ray Train's PlacementGroupCleaner died on "Found multiple
    # active Ray instances". A real node runs one Ray; this points every process at this cluster.
    full_env.update({MARKER: marker, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                     "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash_port}", **RAY_DATA_NO_SCALE_UP})
    cmd = [
        ray_executable(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--num-cpus={math.floor(head_res.pop('CPU', 0))}", f"--num-gpus={math.floor(head_res.pop('GPU', 0))}",
        f"--object-store-memory={OBJECT_STORE_BYTES}", f"--autoscaling-config={config_path}",
        "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]
    log_file = temp_dir / "ray-start.log"
    address = f"http://127.0.0.1:{dash_port}"
    leftovers = lambda: _sigkill(pid for pid, _ in _cluster_processes(marker))  # noqa: E731
    try:
        proc = start_head(cmd, full_env, log_file, address, token, startup_timeout, cleanup=leftovers,
                          cwd=REPO_ROOT)  # job drivers start here
    except BaseException:
        leftovers()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    try:
        yield FakeCluster(address=address, gcs=f"127.0.0.1:{gcs_port}", env=full_env, temp_dir=temp_dir,
                          config=config, marker=marker, process=proc, log_file=log_file)
    finally:
        _stop(proc)
        leftovers()  # fake nodes are started with shutdown_at_exit=False: they outlive the head
        shutil.rmtree(temp_dir, ignore_errors=True)




def actor_nodes(cluster: FakeCluster, class_part: str) -> list[str]:
    """Node ids of the live actors whose class name contains `class_part` (state API)."""
    return sorted({r["node_id"] for r in cluster.state("actors") if class_part in (r.get("class_name") or "") and r.get("state") == "ALIVE"
                   and r.get("node_id")})


def task_nodes(cluster: FakeCluster, name: str) -> list[str]:
    """Node ids of the running tasks named `name` (state API), e.g. a single-worker training run's
    task ("train:<run name>")."""
    return sorted({r["node_id"] for r in cluster.state("tasks") if r.get("name") == name and r.get("state") == "RUNNING"
                   and r.get("node_id")})


__all__ = ["REPO_ROOT", "FakeCluster", "Node", "actor_nodes", "task_nodes", "fake_cluster", "fake_config", "scale_resources"]
