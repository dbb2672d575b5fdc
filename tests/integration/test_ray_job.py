"""Operating it like a Ray service: `ray job submit` against a real head, dashboard metrics, `ray job stop`.

A real head node is started with `ray start --head` (dashboard on 127.0.0.1, Prometheus export port, Ray token
authentication on both ends), the tiny job is submitted with the Jobs SDK and with the `ray job submit` CLI, its
logs are read, the node's Prometheus export is scraped for the vzero metrics, and `ray job stop` must leave a
complete checkpoint behind (the driver checkpoints on SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from vzero.checkpoint import latest_checkpoint
from vzero.metrics_log import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(sys.executable).with_name("ray"))
EXCLUDES = [".venv", ".git", "runs", "results", "bench/results", "*.egg-info", ".ruff_cache", ".pytest_cache"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A real Ray head node on loopback with token auth; yields (dashboard URL, metrics URL, env)."""
    # Every port explicit: the dashboard agent's default HTTP port (52365) is already taken by the session cluster
    # of the in-process tests, and a head whose agent cannot bind answers "No available agent to submit job".
    ports = {"gcs": _free_port(), "dash": _free_port(), "metrics": _free_port(), "agent": _free_port()}
    temp = tempfile.mkdtemp(prefix="vzr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_metrics_report_interval_ms="1000",
        RAY_JOB_STOP_WAIT_TIME_S="60",  # time for the driver to finish its step and checkpoint on SIGTERM
        RAY_USAGE_STATS_ENABLED="0",
    )
    cmd = [
        RAY,
        "start",
        "--head",
        f"--port={ports['gcs']}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dash']}",
        "--include-dashboard=true",
        f"--metrics-export-port={ports['metrics']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        "--num-cpus=6",
        f"--temp-dir={temp}",
    ]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    url = f"http://127.0.0.1:{ports['dash']}"
    deadline = time.time() + 120
    while time.time() < deadline:  # the job server comes up a little after the head
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            time.sleep(1)
    yield url, f"http://127.0.0.1:{ports['metrics']}/metrics", env
    _stop_cluster(temp)
    shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp: str) -> None:
    """Stop THIS head only: every process whose command line names its temp dir (`ray stop` would kill every Ray
    process on the machine, including the other tests' clusters)."""

    def ours() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and temp in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pid in ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while ours() and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def dirty_data(tmp_path_factory, synth_data) -> Path:
    """The synthetic task plus two bad rows, so the quarantine counter has something to count."""
    table = pq.read_table(synth_data)
    rows = table.slice(0, 2).to_pylist()
    rows[0].update(id="bad-truncated", image=rows[0]["image"][:100])
    rows[1].update(id="bad-question", question="   ")
    path = tmp_path_factory.mktemp("dirty") / "dirty.parquet"
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist(rows, schema=table.schema)]), path)
    return path


def _entrypoint(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "vzero.cli",
        "train",
        "--config",
        "configs/tiny-cpu.yaml",
        f"output_dir={out}",
        f"data.path={data}",
        "data.synth=null",
        f"student.path={model}",
        "student.build=null",
        "rollout.max_tokens=8",
        "logging.progress_bar=false",
        *extra,
    ]
    return args


class Jobs:
    """The Ray Jobs REST API (what JobSubmissionClient speaks) with the bearer token; submission goes through the CLI.

    REST keeps this test process out of Ray's process-wide auth-token cache, which the other tests' local cluster
    (auth disabled) has already initialised.
    """

    def __init__(self, url: str, env: dict):
        self.url, self.env = url, env

    def _get(self, path: str, token: bool = True) -> bytes:
        req = urllib.request.Request(self.url + path)
        if token:
            req.add_header("Authorization", "Bearer " + self.env["RAY_AUTH_TOKEN"])
        return urllib.request.urlopen(req, timeout=10).read()

    def submit(self, entrypoint: list[str]) -> str:
        cmd = [
            RAY,
            "job",
            "submit",
            "--address",
            self.url,
            "--working-dir",
            str(REPO),
            "--no-wait",
            "--runtime-env-json",
            json.dumps({"excludes": EXCLUDES, "env_vars": {"HF_HUB_OFFLINE": "1"}}),
            "--",
            *entrypoint,
        ]
        deadline = time.time() + 180
        while True:
            res = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=180)
            # A head that just started may not have its job agent registered yet (slow, loaded machines): Ray
            # answers "No available agent to submit job, please try again later".
            if res.returncode != 0 and "try again later" in res.stderr and time.time() < deadline:
                time.sleep(3)
                continue
            assert res.returncode == 0, res.stdout + res.stderr
            return re.search(r"Job '([^']+)' submitted successfully", res.stdout + res.stderr).group(1)

    def status(self, job_id: str) -> str:
        return json.loads(self._get(f"/api/jobs/{job_id}"))["status"]

    def logs(self, job_id: str) -> str:
        return json.loads(self._get(f"/api/jobs/{job_id}/logs"))["logs"]

    def stop(self, job_id: str) -> None:
        res = subprocess.run(
            [RAY, "job", "stop", "--address", self.url, job_id],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert res.returncode == 0, res.stdout + res.stderr

    def wait(self, job_id: str, states: set[str], timeout: float = 420) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(job_id)
            if status in states:
                return status
            if status in {"FAILED", "STOPPED", "SUCCEEDED"}:
                raise AssertionError(f"job ended {status}:\n{self.logs(job_id)[-4000:]}")
            time.sleep(2)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s:\n{self.logs(job_id)[-4000:]}")


def _scrape(url: str) -> dict[str, list[tuple[str, float]]]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_vzero_[a-z_]+)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            found.setdefault(m.group(1), []).append((m.group(2) or "", float(m.group(3))))
    return found


def test_job_submit_runs_the_job_with_token_auth_and_exports_metrics(head, tiny_model, dirty_data, tmp_path) -> None:
    url, metrics_url, env = head
    jobs = Jobs(url, env)
    with pytest.raises(urllib.error.HTTPError, match="401"):  # token auth is really on
        jobs._get("/api/jobs/", token=False)
    out = tmp_path / "job"
    steps = 6
    job_id = jobs.submit(_entrypoint(out, tiny_model, dirty_data, f"steps={steps}"))
    # Gauges live as long as the driver that sets them: scrape while the job runs (as Prometheus would).
    wanted = {
        "ray_vzero_rollout_tokens_per_s",
        "ray_vzero_teacher_tokens_per_s",
        "ray_vzero_learner_tokens_per_s",
        "ray_vzero_loss",
        "ray_vzero_gate_weight_mean",
        "ray_vzero_gate_frac_delta_pos",
        "ray_vzero_weight_push_seconds",
        "ray_vzero_weight_push_gb_per_s",
        "ray_vzero_policy_version",
        "ray_vzero_staleness",
        "ray_vzero_quarantined_rows_total",
        "ray_vzero_gate_weight_bucket",
    }
    deadline = time.time() + 420
    found: dict = {}
    while time.time() < deadline and not wanted <= set(found) and jobs.status(job_id) in {"PENDING", "RUNNING"}:
        found = _scrape(metrics_url)
        time.sleep(1)
    assert wanted <= set(found), f"missing from the Prometheus export: {sorted(wanted - set(found))}"
    assert jobs.wait(job_id, {"SUCCEEDED"}) == "SUCCEEDED"
    logs = jobs.logs(job_id)
    assert env["RAY_AUTH_TOKEN"] not in logs, "no secrets in logs"
    assert env["RAY_AUTH_TOKEN"] not in (out / "config.yaml").read_text()
    summary = json.loads([ln for ln in logs.splitlines() if ln.startswith('{"output_dir"')][-1])
    assert summary["steps"] == steps and Path(summary["checkpoint"]).name == f"step_{steps:06d}"
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[-1]["data/quarantined"] == 2

    value = {k: v[0][1] for k, v in found.items()}
    assert 1 <= value["ray_vzero_policy_version"] <= steps
    assert value["ray_vzero_rollout_tokens_per_s"] > 0 and value["ray_vzero_teacher_tokens_per_s"] > 0
    assert 0 <= value["ray_vzero_gate_weight_mean"] <= 2
    assert 0 <= value["ray_vzero_gate_frac_delta_pos"] <= 1
    assert value["ray_vzero_quarantined_rows_total"] == 2
    assert all('role="' in tags for tags, _ in found["ray_vzero_loss"])
    inf_bucket = [v for tags, v in found["ray_vzero_gate_weight_bucket"] if 'le="+Inf"' in tags]
    per_step = 4 * 4  # one observation per trajectory: 4 prompts x n=4
    assert inf_bucket and inf_bucket[0] > 0 and inf_bucket[0] % per_step == 0


def test_job_stop_finishes_the_step_and_leaves_a_checkpoint(head, tiny_model, synth_data, tmp_path) -> None:
    url, _, env = head
    jobs = Jobs(url, env)
    out = tmp_path / "stopped"
    job_id = jobs.submit(_entrypoint(out, tiny_model, synth_data, "steps=500", "checkpoint.every=0"))
    deadline = time.time() + 300
    while time.time() < deadline and not (
        (out / "metrics.jsonl").is_file() and len(read_metrics(out / "metrics.jsonl")) >= 2
    ):
        assert jobs.status(job_id) in {"PENDING", "RUNNING"}, jobs.logs(job_id)[-3000:]
        time.sleep(1)
    jobs.stop(job_id)
    assert jobs.wait(job_id, {"STOPPED"}, timeout=120) == "STOPPED"
    logged = read_metrics(out / "metrics.jsonl")
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None, jobs.logs(job_id)[-3000:]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == len(logged) >= 2, "the checkpoint holds exactly the steps that were logged"
    assert not list((out / "checkpoints").glob("*.tmp-*")), "no half-written checkpoint left behind"
    assert "SIGTERM" in jobs.logs(job_id)
