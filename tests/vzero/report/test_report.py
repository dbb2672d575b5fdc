"""`vzero report` on real runs (vLLM + sequence gate via the CLI; transformers + token gate; gate disabled): what the
page shows matches what the run wrote, the page is self-contained, a run still being written and missing optional
files degrade to notes, and a directory that is not a run is a one-line user error. The browser test is in
test_browser.py; the quiet console of the CLI run is checked here too (it is the same run)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO
from vzero.report import build_report
from vzero.report.plots import CURVES

pytestmark = [pytest.mark.ray, pytest.mark.slow]


class _Page(HTMLParser):
    """Collects, per gallery article: its uid, image sources, weight badges, responses and token tooltips."""

    def __init__(self, text: str):
        super().__init__()
        self.articles: list[dict] = []
        self.srcs: list[str] = []
        self.scripts = 0
        self._badge = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.srcs.append(a["src"])
        if tag == "article":
            self.articles.append({"uid": a["data-uid"], "imgs": 0, "badges": [], "responses": 0, "tips": []})
        elif self.articles:
            art = self.articles[-1]
            art["imgs"] += tag == "img"
            art["responses"] += tag == "li"
            self._badge = a.get("class") == "badge"
            if tag == "span" and a.get("title", "").startswith("token "):
                art["tips"].append(a["title"])

    def handle_data(self, data):
        if self._badge:
            self.articles[-1]["badges"].append(data)
            self._badge = False


def _rows(run: Path, step: int) -> dict[str, list[dict]]:
    table = pq.read_table(run / f"trajectories/step_{step:06d}.parquet")  # metrics step k <- file k
    by_uid: dict[str, list[dict]] = {}
    for r in sorted(table.to_pylist(), key=lambda r: r["sample_index"]):
        by_uid.setdefault(r["uid"], []).append(r)
    return by_uid


@pytest.mark.parametrize("name", ["vllm-sequence", "hf-token", "hf-off"])
def test_the_page_shows_what_the_run_wrote(all_runs, tmp_path, name) -> None:
    run = all_runs[name]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    page_path = build_report(run, tmp_path / "report", steps=[1, 2], prompts=2)
    text = page_path.read_text()
    page = _Page(text)

    assert page.scripts == 0 and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    assert not re.search(r"(src|href)=\"(?!data:|#)", text), "nothing outside the page is referenced"
    assert sorted(p.stem for p in (tmp_path / "report/curves").iterdir()) == sorted(CURVES)
    hist = {p.stem for p in (tmp_path / "report/histograms").iterdir()}
    assert hist == ({"weights", "delta", "token_weights"} if name == "hf-token" else {"weights", "delta"})

    n, per_step = cfg["rollout"]["n"], min(2, cfg["rollout"]["prompts_per_step"])
    assert len(page.articles) == 2 * per_step
    for i, art in enumerate(page.articles):
        rows = _rows(run, 1 + i // per_step)[art["uid"]]
        assert art["imgs"] == 3, "full image, positive view, negative view"
        assert art["responses"] == n == len(rows)
        assert [b.split()[1] for b in art["badges"]] == [f"{r['weight']:.2f}" for r in rows]
        assert len(art["tips"]) == sum(len(r["response_ids"]) for r in rows), "one coloured span per token"
        first = rows[0]
        delta = first["lp_pos"][0] - first["lp_neg"][0]
        assert art["tips"][0].startswith(f"token {first['response_ids'][0]}: Δ {delta:+.3f}")
    if name == "hf-token":
        assert all("token weight" in t for art in page.articles for t in art["tips"])
    if name == "hf-off":
        assert "gate.enabled=false" in text and all("(gate off)" in b for a in page.articles for b in a["badges"])
    assert "finished: 2 of 2 steps" in text


def test_the_default_run_is_quiet_and_its_summary_names_the_report(vllm_run) -> None:
    lines = (vllm_run.stdout + vllm_run.stderr).splitlines()
    assert not [ln for ln in lines if re.search(r"\bINFO\b.*\[[\w.]+\.py:\d+\]", ln)], "no vLLM INFO lines"
    assert not [ln for ln in lines if "it/s]" in ln], "no progress bars from the actors"
    assert "Started a local Ray instance" not in vllm_run.stderr
    assert [ln.split("  ")[0] for ln in lines if ln.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert f"vzero report {vllm_run.out}" in vllm_run.stdout
    assert len(lines) < 40, f"{len(lines)} lines:\n" + "\n".join(lines)  # 118 before logging was quieted


def test_a_run_being_written_is_reported_with_notes(hf_runs, tmp_path) -> None:
    run = Path(shutil.copytree(hf_runs["token"], tmp_path / "live"))
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(metrics[0] + "\n" + metrics[1][: len(metrics[1]) // 2])  # step 2 half written
    shutil.rmtree(run / "checkpoints")
    (run / "trajectories/step_000002.parquet.tmp").write_bytes(b"PAR1 partial")
    (run / "versions.json").unlink()
    text = build_report(run, tmp_path / "report").read_text()
    assert "in progress or stopped: 1 of 2 steps logged" in text
    assert "metrics.jsonl line 2 is incomplete" in text
    assert "no versions.json" in text
    assert len(_Page(text).articles) == 2 * 2, "both finished trajectory files are in the gallery"


def test_missing_optional_files_leave_notes_not_errors(hf_runs, tmp_path) -> None:
    run = Path(shutil.copytree(hf_runs["off"], tmp_path / "run"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["path"] = str(tmp_path / "moved-away.parquet")
    cfg["student"]["path"] = str(tmp_path / "no-model")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.rmtree(run / "checkpoints")  # with student.path gone: no tokenizer anywhere
    page = _Page(text := build_report(run, tmp_path / "report").read_text())
    assert "not found from here: the gallery shows no images or questions" in text
    assert "no tokenizer.json" in text
    assert page.articles and all(a["imgs"] == 0 and a["responses"] == 3 for a in page.articles)
    shutil.rmtree(run / "trajectories")
    text = build_report(run, tmp_path / "report2").read_text()
    assert "no trajectories/" in text and not _Page(text).articles


def test_a_directory_that_is_not_a_run_is_a_one_line_user_error(tmp_path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "vzero.cli", "report", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: {tmp_path} is not a vzero run directory (no config.yaml or metrics.jsonl in it)"]
