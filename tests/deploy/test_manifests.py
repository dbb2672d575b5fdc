"""deploy/: the KubeRay manifests pass the offline KubeRay v1 validator and fit the config they run, exactly.

The validator (`../shared/kuberay/validate.py`, the KubeRay v1.7.0 CRD schemas + operator rules) checks each
RayJob/RayCluster the way the API server and the operator would. On top of it, these tests tie the manifests to the
project: the worker groups provide exactly the GPUs `requested_resources(config)` asks for (no idle GPUs) and at
least its CPUs, each actor fits on one pod, the entrypoint's config exists and loads, token auth is on everywhere,
/dev/shm is a bounded memory volume, the shared volume holds every path the config names, and the Grafana dashboard
and PodMonitors match what vzero.telemetry exports and what the pods expose.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from vzero import telemetry
from vzero.cluster import requested_resources
from vzero.config import TrainConfig, load_config
from vzero.placement import bundles, check_layout

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# the shared/ kit beside the repo (or beside the directory of git worktrees)
VALIDATOR = next(
    (d / "shared/kuberay/validate.py" for d in (REPO.parent, REPO.parent.parent) if (d / "shared/kuberay").is_dir()),
    REPO.parent / "shared/kuberay/validate.py",
)
RAY_WORKLOADS = ("rayjob.yaml", "raycluster.yaml", "rayjob-8gpu.yaml")


# -- helpers ------------------------------------------------------------------------------------------------------
def load_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def cluster_spec(name: str) -> dict[str, Any]:
    (doc,) = load_docs(name)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def config_path(name: str) -> tuple[Path, list[str]]:
    """The config a workload runs and its key=value overrides: the RayJob's entrypoint, or the RayCluster's
    documented `ray job submit ... -- vzero train --config ...` command."""
    (doc,) = load_docs(name)
    if doc["kind"] == "RayJob":
        argv = shlex.split(doc["spec"]["entrypoint"])
    else:
        m = re.search(r"vzero train --config (\S+)", (DEPLOY / name).read_text())
        assert m, f"{name} documents no `vzero train --config ...` command"
        argv = ["vzero", "train", "--config", m.group(1)]
    assert argv[:3] == ["vzero", "train", "--config"], f"{name}: entrypoint is not `vzero train --config ...`"
    overrides = [a for a in argv[4:] if "=" in a and not a.startswith("-")]
    return REPO / argv[3], overrides


def workload_config(name: str) -> TrainConfig:
    path, overrides = config_path(name)
    return load_config(path, overrides)


def pod_templates(name: str) -> dict[str, dict[str, Any]]:
    """group name -> pod template, head included (and the RayJob's submitter)."""
    (doc,) = load_docs(name)
    spec = cluster_spec(name)
    out = {"head": spec["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out["submitter"] = doc["spec"]["submitterPodTemplate"]
    return out


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]  # KubeRay: the first container runs Ray


def cpu_quantity(q: str | int) -> Decimal:
    s = str(q)
    return Decimal(s[:-1]) / 1000 if s.endswith("m") else Decimal(s)


_BYTES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def byte_quantity(q: str | int) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]i?|k)?", str(q))
    assert m, f"unsupported quantity {q!r}"
    return int(m.group(1)) * _BYTES.get(m.group(2) or "", 1)


def worker_pods(name: str) -> list[tuple[Decimal, int]]:
    """(CPUs, GPUs) of every worker pod the cluster starts with (replicas x group limits)."""
    pods = []
    for g in cluster_spec(name)["workerGroupSpecs"]:
        limits = ray_container(g["template"])["resources"]["limits"]
        pods += [(cpu_quantity(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0)))] * int(g["replicas"])
    return pods


def pod_resources(name: str) -> list[dict[str, float]]:
    """What Ray sees on each worker pod: CPUs and GPUs from the limits, custom resources from rayStartParams
    (`resources: '"{\\"name\\": n}"'`, the JSON string KubeRay passes to `ray start --resources`)."""
    out = []
    for g in cluster_spec(name)["workerGroupSpecs"]:
        limits = ray_container(g["template"])["resources"]["limits"]
        res = {"CPU": float(cpu_quantity(limits["cpu"])), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        custom = g.get("rayStartParams", {}).get("resources")
        if custom:
            res.update(json.loads(json.loads(custom)))
        out += [res] * int(g["replicas"])
    return out


# -- the offline KubeRay validator --------------------------------------------------------------------------------
def test_every_manifest_passes_the_kuberay_validator_without_warnings() -> None:
    if not VALIDATOR.is_file():
        pytest.skip(f"KubeRay validator not found at {VALIDATOR} (the shared/ kit beside the repo)")
    proc = subprocess.run(
        [sys.executable, str(VALIDATOR), "-v", str(DEPLOY)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    lines = proc.stdout.splitlines()
    assert not [ln for ln in lines if ln.startswith("FAIL")], report
    assert not [ln for ln in lines if "warning:" in ln], report
    ok = {ln.split()[-1] for ln in lines if ln.startswith("OK")}
    for name in RAY_WORKLOADS:
        (doc,) = load_docs(name)
        assert f"{doc['kind']}/{doc['metadata']['name']}" in ok, report


# -- sizing: the manifests provide what the config asks for ----------------------------------------------------------
@pytest.mark.parametrize("name", RAY_WORKLOADS)
def test_worker_gpus_match_the_config_exactly_and_cpus_suffice(name: str) -> None:
    want = requested_resources(workload_config(name))
    pods = worker_pods(name)
    have_cpu, have_gpu = sum(c for c, _ in pods), sum(g for _, g in pods)
    assert have_gpu == want["GPU"], f"{name}: workers provide {have_gpu} GPUs, the actors use {want['GPU']:g}"
    assert have_cpu >= Decimal(str(want["CPU"])), f"{name}: workers provide {have_cpu} CPUs < {want['CPU']:g}"
    head = cluster_spec(name)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "actors must stay off the head (it runs the driver)"
    assert "nvidia.com/gpu" not in ray_container(head["template"])["resources"]["limits"]


@pytest.mark.parametrize("name", RAY_WORKLOADS)
def test_every_actor_fits_on_a_worker_pod(name: str) -> None:
    """The driver's own up-front check (vzero/placement.py: every bundle, largest first, into the nodes; learner
    ranks, tensor-parallel engines and custom resources included) passes on the pods the manifest starts: the
    totals matching is not enough if one pod is too small for the learner or a TP engine's GPUs are split."""
    check_layout(workload_config(name), pod_resources(name))


def test_the_multi_gpu_layout_pins_every_role_to_its_pod_and_pushes_over_the_collective() -> None:
    """rayjob-8gpu.yaml: a learner group of 4 GPUs on one pod, 2 samplers + a TP-2 teacher on the other; the
    custom resources each pod advertises are exactly what its roles ask for, so no role can take another's GPU."""
    cfg = workload_config("rayjob-8gpu.yaml")
    assert cfg.learner.world_size == 4 and cfg.learner.weight_transport == "collective"
    assert cfg.teacher.vllm.tensor_parallel_size == 2 and cfg.rollout.num_samplers == 2
    pods = {
        g["groupName"]: r
        for g, r in zip(
            cluster_spec("rayjob-8gpu.yaml")["workerGroupSpecs"], pod_resources("rayjob-8gpu.yaml"), strict=True
        )
    }
    by_pod: dict[str, dict[str, float]] = {}
    for b in bundles(cfg):
        (key,) = [k for k in b.resources if k.startswith("vzero_")]
        (pod,) = [g for g, r in pods.items() if key in r]
        for k, v in b.resources.items():
            by_pod.setdefault(pod, {})[k] = by_pod.setdefault(pod, {}).get(k, 0.0) + v
    assert by_pod["learner"]["GPU"] == pods["learner"]["GPU"] == 4
    assert by_pod["rollout"]["GPU"] == pods["rollout"]["GPU"] == 4
    for pod, want in by_pod.items():
        custom = {k: v for k, v in want.items() if k.startswith("vzero_")}
        assert custom == {k: v for k, v in pods[pod].items() if k.startswith("vzero_")}, pod
        assert want["CPU"] <= pods[pod]["CPU"], pod
    for tmpl in [g["template"] for g in cluster_spec("rayjob-8gpu.yaml")["workerGroupSpecs"]]:
        env = {e["name"]: e.get("value") for e in ray_container(tmpl)["env"]}
        assert env.get("NCCL_SOCKET_IFNAME"), "NCCL needs the pod network interface named"


def test_the_8_gpu_manifest_runs_the_papers_setup_and_the_qwen2_5_layout_fits_the_same_pods() -> None:
    """rayjob-8gpu.yaml's entrypoint is the paper config (Qwen3.5-4B / 27B); the Qwen2.5-VL 8-GPU config asks for the
    same bundles, so a user switching `--config` gets the same placement (no idle or missing GPU)."""
    path, _ = config_path("rayjob-8gpu.yaml")
    assert path.name == "vzero-paper-qwen3_5.yaml"
    other = load_config(REPO / "configs/qwen2_5-vl-3b-32b-8gpu.yaml")
    check_layout(other, pod_resources("rayjob-8gpu.yaml"))
    assert requested_resources(other) == requested_resources(workload_config("rayjob-8gpu.yaml"))
    assert sorted(b.resources.items() for b in bundles(other)) == sorted(
        b.resources.items() for b in bundles(workload_config("rayjob-8gpu.yaml"))
    )


def test_the_4_gpu_config_pushes_weights_over_the_collective() -> None:
    cfg = load_config(REPO / "configs/qwen2_5-vl-3b-7b-gpu.yaml")
    assert cfg.learner.weight_transport == "collective"
    for name in ("rayjob.yaml", "raycluster.yaml"):
        for g in cluster_spec(name)["workerGroupSpecs"]:
            env = {e["name"]: e.get("value") for e in ray_container(g["template"])["env"]}
            assert env.get("NCCL_SOCKET_IFNAME"), f"{name}: the GPU pod names no NCCL interface"


@pytest.mark.parametrize("name", RAY_WORKLOADS)
def test_entrypoint_config_exists_and_loads_from_the_images_working_dir(name: str) -> None:
    path, _ = config_path(name)
    assert path.is_file(), f"{name} runs {path.relative_to(REPO)}, which does not exist"
    cfg = workload_config(name)
    assert cfg.ray.address is None, "inside `ray job submit` the driver must join the job's cluster (RAY_ADDRESS)"
    (doc,) = load_docs(name)
    if doc["kind"] == "RayJob":  # the relative config path resolves in working_dir: the repo copy in the image
        workdir = re.search(r"^WORKDIR\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
        assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"] == workdir


def test_runtime_env_turns_on_token_auth_and_leaves_the_drivers_env_vars_alone(monkeypatch) -> None:
    """runtimeEnvYAML parses, sets RAY_AUTH_MODE=token and a stop grace period, holds no token, and sets none of
    the variables the driver's own ray.init passes (Ray refuses to merge the same key from job and driver)."""
    import ray

    from vzero import cluster

    (doc,) = load_docs("rayjob.yaml")
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_TOKEN" not in env, "the token belongs in the Secret, not in the job's (visible) runtime_env"
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 300, "ray job stop must leave the driver time to checkpoint"

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    cluster.connect(workload_config("rayjob.yaml"))
    driver_keys = set(seen["runtime_env"]["env_vars"])
    assert driver_keys and not driver_keys & set(env), f"job and driver both set {driver_keys & set(env)}"


@pytest.mark.parametrize("name", RAY_WORKLOADS)
def test_every_ray_container_gets_the_token_from_the_secret(name: str) -> None:
    (secret,) = load_docs("secret-ray-token.example.yaml")
    for group, tmpl in pod_templates(name).items():
        env = {e["name"]: e for e in ray_container(tmpl).get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name} {group}: RAY_AUTH_MODE=token missing"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], f"{name} {group}"


@pytest.mark.parametrize("name", RAY_WORKLOADS)
def test_ray_pods_mount_dev_shm_as_a_bounded_memory_volume_above_the_object_store(name: str) -> None:
    spec = cluster_spec(name)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        tmpl = g["template"]
        volumes = {v["name"]: v for v in tmpl["spec"]["volumes"]}
        (mount,) = [m for m in ray_container(tmpl)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        empty_dir = volumes[mount["name"]]["emptyDir"]
        assert empty_dir["medium"] == "Memory" and "sizeLimit" in empty_dir, f"{name}: /dev/shm must be bounded RAM"
        limit = byte_quantity(empty_dir["sizeLimit"])
        store = int(g.get("rayStartParams", {}).get("object-store-memory", 0))
        assert store < limit, f"{name}: object store ({store} B) must fit in /dev/shm ({limit} B)"
        assert limit < byte_quantity(ray_container(tmpl)["resources"]["limits"]["memory"])


@pytest.mark.parametrize("name", RAY_WORKLOADS)
def test_gpu_pods_tolerate_the_gpu_taint_and_request_what_they_limit(name: str) -> None:
    for g in cluster_spec(name)["workerGroupSpecs"]:
        res = ray_container(g["template"])["resources"]
        if "nvidia.com/gpu" not in res["limits"]:
            continue
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tolerations)


@pytest.mark.parametrize("name", RAY_WORKLOADS)
def test_every_path_the_config_names_is_on_the_shared_volume_of_head_and_gpu_pods(name: str) -> None:
    """The learner (GPU pod) writes checkpoints that the driver (head) commits and reads: one shared filesystem."""
    (pvc,) = load_docs("pvc.yaml")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "head and GPU pods sit on different nodes"
    mounts = set()
    for group, tmpl in pod_templates(name).items():
        if group == "submitter":
            continue
        claim_of = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in tmpl["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        pvc_mounts = [
            m["mountPath"]
            for m in ray_container(tmpl)["volumeMounts"]
            if claim_of.get(m["name"]) == pvc["metadata"]["name"]
        ]
        assert pvc_mounts, f"{name} {group}: the PVC is not mounted"
        mounts.update(pvc_mounts)
    (mount,) = mounts
    cfg = workload_config(name)
    for what, path in [
        ("output_dir", cfg.output_dir),
        ("data.path", cfg.data.path),
        ("student.path", cfg.student.path),
        ("teacher model path", cfg.teacher_model.path),
    ]:
        assert Path(path).is_relative_to(mount), f"{name}: {what} {path!r} is not under the shared mount {mount}"


def test_images_carry_the_clusters_ray_version_and_match_the_dockerfile_and_kustomization() -> None:
    docker = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)", docker, re.M).group(1)
    assert re.search(r"-(gpu|cu\d+)", base), f"{base} is a CPU image"
    (kustomization,) = load_docs("kustomization.yaml")
    (image,) = kustomization["images"]
    for name in RAY_WORKLOADS:
        version = cluster_spec(name)["rayVersion"]
        assert base.startswith(version + "-"), f"Dockerfile base {base} is not Ray {version}"
        for group, tmpl in pod_templates(name).items():
            repo, tag = ray_container(tmpl)["image"].rsplit(":", 1)
            assert f"ray{version}" in tag, f"{name} {group}: image tag {tag} does not name Ray {version}"
            assert (repo, tag) == (image["name"], image["newTag"]), f"{name} {group}: not the kustomization image"


def test_kustomization_lists_existing_files_and_only_one_ray_cluster() -> None:
    (k,) = load_docs("kustomization.yaml")
    files = list(k["resources"]) + [f for g in k.get("configMapGenerator", []) for f in g["files"]]
    assert all((DEPLOY / f).is_file() for f in files), files
    assert len(set(k["resources"]) & set(RAY_WORKLOADS)) == 1, "rayjob.yaml and raycluster.yaml each take 4 GPUs"
    assert "secret-ray-token.example.yaml" not in k["resources"], "a placeholder token must never be applied"


# -- monitoring -----------------------------------------------------------------------------------------------------
def dashboard_exprs() -> tuple[dict[str, Any], list[tuple[str, str]]]:
    board = json.loads((DEPLOY / "grafana/vzero-dashboard.json").read_text())
    panels = [p for top in board["panels"] for p in [top, *top.get("panels", [])]]
    exprs = [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]
    return board, exprs


def exported_names() -> dict[str, str]:
    """vzero.telemetry metric -> the series name Prometheus stores (Ray 2.60: `ray_` prefix, counters `_total`,
    histograms `_bucket`/`_sum`/`_count`)."""
    names = {n: f"ray_{n}" for n in telemetry.GAUGES}
    names.update({n: f"ray_{n}_total" for n in [*telemetry.COUNTERS, telemetry.QUARANTINE]})
    names[telemetry.WEIGHT_HIST] = f"ray_{telemetry.WEIGHT_HIST}_bucket"
    return names


def test_grafana_dashboard_has_a_panel_for_every_telemetry_metric_and_no_stale_ones() -> None:
    _, exprs = dashboard_exprs()
    missing = [
        n for n, series in exported_names().items() if not any(re.search(rf"\b{series}\{{", e) for _, e in exprs)
    ]
    assert not missing, f"no dashboard panel queries {missing}"
    queried = {m for _, e in exprs for m in re.findall(r"\bray_vzero_\w+", e)}
    assert queried <= set(exported_names().values()), (
        f"panels query unknown series {queried - set(exported_names().values())}"
    )


def test_grafana_dashboard_is_templated_on_datasource_and_ray_cluster() -> None:
    board, exprs = dashboard_exprs()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    cluster_vars = [n for n, v in variables.items() if "ray_io_cluster)" in str(v.get("query", ""))]
    assert cluster_vars, "no variable lists ray_io_cluster values"
    for title, expr in exprs:
        assert f'ray_io_cluster=~"${cluster_vars[0]}"' in expr, f"panel {title!r} ignores the cluster variable"
    for p in board["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_podmonitors_select_head_and_worker_ray_pods_on_ports_they_expose() -> None:
    monitors = load_docs("podmonitor.yaml")
    assert all(m["apiVersion"] == "monitoring.coreos.com/v1" and m["kind"] == "PodMonitor" for m in monitors)
    assert all(m["metadata"]["labels"]["release"] == "prometheus" for m in monitors)
    by_type = {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"]: m for m in monitors}
    assert set(by_type) == {"head", "worker"}
    for name in RAY_WORKLOADS:
        spec = cluster_spec(name)
        pods = {
            "head": [spec["headGroupSpec"]["template"]],
            "worker": [g["template"] for g in spec["workerGroupSpecs"]],
        }
        for node_type, monitor in by_type.items():
            selector = {k: v for k, v in monitor["spec"]["selector"]["matchLabels"].items() if k != "ray.io/node-type"}
            for tmpl in pods[node_type]:
                labels = tmpl.get("metadata", {}).get("labels", {})
                assert selector.items() <= labels.items(), f"{name}: {node_type} pods lack labels {selector}"
                ports = {p["name"] for p in ray_container(tmpl).get("ports", [])} | {"metrics"}  # KubeRay adds it
                for ep in monitor["spec"]["podMetricsEndpoints"]:
                    assert ep["port"] in ports, f"{name}: {node_type} pods expose no port {ep['port']!r}"
                    assert any(r["targetLabel"] == "ray_io_cluster" for r in ep["relabelings"])


# -- the single-GPU config ------------------------------------------------------------------------------------------
def test_colocated_config_shares_one_gpu_and_its_engines_leave_the_learner_room() -> None:
    """Ray packs fractional actors onto one GPU only if their fractions sum to <= 1; vLLM engines each claim
    gpu_memory_utilization of the whole GPU, and the learner lives on what they leave."""
    cfg = load_config(REPO / "configs/qwen2_5-vl-1gpu.yaml")
    assert requested_resources(cfg)["GPU"] <= 1.0 and cfg.ray.num_gpus == 1
    engines = (
        cfg.rollout.num_samplers * cfg.rollout.vllm.gpu_memory_utilization
        + cfg.teacher.num_actors * cfg.teacher.vllm.gpu_memory_utilization
    )
    assert engines <= 0.5, f"the vLLM engines claim {engines:.0%} of the GPU; the learner needs the larger half"
