"""Security defaults stay: no code from a model directory runs unless asked, a local cluster's dashboard listens on
loopback only, and a dataset's image column is bytes only (a path or URL in it is never opened or fetched: the row
is quarantined as `wrong_type:image`). Pickle refusal is tests/vzero/models/test_tiny.py
(`test_loading_refuses_pickle_checkpoints_and_missing_dirs`), checkpoints without pickle are checked after every
fault run (bench/fault_harness.py `differences`), and token auth on clusters is tests/integration/test_ray_job.py
plus tests/deploy/test_manifests.py."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from tests.vzero.image_helpers import png
from vzero.config import load_config
from vzero.data.commands import check_file
from vzero.data.quarantine import QuarantineWriter
from vzero.data.stream import NotEnoughPromptsError, PromptStream


def test_every_shipped_config_leaves_remote_code_off() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        models = [cfg.student, cfg.teacher_model]
        assert not any(m.trust_remote_code for m in models), f"{path.name} turns trust_remote_code on"


def test_code_shipped_in_a_model_directory_never_runs(tiny_model, tmp_path) -> None:
    from vzero.models.loading import load_model, load_processor

    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_model, evil)
    marker = tmp_path / "code-ran"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForImageTextToText": "evil.EvilModel",
        "AutoProcessor": "evil.EvilProcessor",
    }
    (evil / "config.json").write_text(json.dumps(config))
    load_model(evil)  # the built-in class of its model_type; auto_map is ignored without trust_remote_code
    load_processor(evil)
    assert not marker.exists(), "a model directory's own code ran"


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:  # the stdlib's name
        type(self).hits.append(self.path)
        body = png()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_image_paths_and_urls_in_a_dataset_are_never_opened_or_fetched(tmp_path) -> None:
    """Every way to point at an image instead of holding it: a valid PNG outside the dataset's folder, one inside it,
    `file://` and http URLs to a server that answers with a valid PNG, and the HF `{bytes, path}` struct. Had any
    been read, its row would be valid; each is quarantined as `wrong_type:image`, and the server saw no request."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = tmp_path / "dataset"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(png())
    (root / "inside.png").write_bytes(png())
    refs = [
        str(tmp_path / "outside.png"),
        "../outside.png",
        "inside.png",
        f"file://{tmp_path / 'outside.png'}",
        f"http://127.0.0.1:{server.server_port}/image.png",
    ]
    box = [2.0, 2.0, 12.0, 10.0]
    rows = [{"id": f"r{i}", "image": ref, "question": "q?", "evidence_box": box} for i, ref in enumerate(refs)]
    pq.write_table(pa.Table.from_pylist(rows), root / "paths.parquet")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.table(
        {
            "id": ["s0"],
            "image": pa.array([{"bytes": None, "path": str(tmp_path / "outside.png")}], type=struct),
            "question": ["q?"],
            "evidence_box": [box],
        }
    )
    pq.write_table(hf, root / "hf-struct.parquet")
    try:
        for name, n in (("paths.parquet", len(refs)), ("hf-struct.parquet", 1)):
            assert check_file(root / name, quarantine=None)["reasons"] == {"wrong_type:image": n}
            with QuarantineWriter(tmp_path / f"q-{name}") as quarantine:
                stream = PromptStream(root / name, seed=0, quarantine=quarantine)
                with pytest.raises(NotEnoughPromptsError):
                    stream.next_batch(1)
            assert dict(stream.reasons) == {"wrong_type:image": n}
        assert _CountingHandler.hits == [], "a URL in a dataset was fetched"
    finally:
        server.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_clusters_dashboard_listens_on_loopback_only(tmp_path) -> None:
    """`vzero.cluster.connect` with the dashboard on: its socket is bound to 127.0.0.1 (from /proc/net/tcp, where a
    0.0.0.0 bind would show as 00000000)."""
    script = """
import json, ray
from vzero.cluster import connect
from vzero.config import load_config
cfg = load_config(None, ["ray.include_dashboard=true", "ray.num_cpus=1"])
connect(cfg)
url = ray._private.worker.global_worker.node.address_info["webui_url"]
listening = [line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:] if line.split()[3] == "0A"]
print(json.dumps({"url": url, "listening": listening}))
ray.shutdown()
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    host, port = found["url"].rsplit(":", 1)
    assert host == "127.0.0.1"
    bound = [addr for addr in found["listening"] if int(addr.split(":")[1], 16) == int(port)]
    assert bound == ["0100007F:" + f"{int(port):04X}"], found
