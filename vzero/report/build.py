"""Gather a run's report and write it: `build_report(run_dir, out)` -> out/index.html plus the PNGs it shows.

Files written under `out` (default RUN_DIR/report): index.html (self-contained), curves/*.png, histograms/*.png and
gallery/step_<s>_<uid>_{full,positive,negative}.png. index.html is written to a temporary name and renamed, so a
browser never opens a half-written page.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from vzero.metrics_log import software_versions
from vzero.report.gallery import build_gallery
from vzero.report.html import Page, render_page
from vzero.report.load import RunData, load_run, read_trajectories
from vzero.report.plots import curve_figures, histogram_figures

DEFAULT_PROMPTS = 3  # prompts per gallery step
HISTOGRAM_STEPS = 4  # steps shown in the histograms


def spread(steps: list[int], k: int) -> list[int]:
    """Up to k of `steps` (sorted), evenly spaced, always with the first and the last."""
    if len(steps) <= k:
        return list(steps)
    if k == 1:
        return [steps[-1]]
    return sorted({steps[round(i * (len(steps) - 1) / (k - 1))] for i in range(k)})


def build_report(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    steps: list[int] | None = None,
    prompts: int = DEFAULT_PROMPTS,
) -> Path:
    """Write the report of `run_dir`; `steps` are the gallery's steps (metrics numbering; default first, middle,
    last). Returns the path of index.html. Raises NotARunError for a directory that is not a run."""
    run = load_run(Path(run_dir))
    out = Path(out) if out is not None else run.run_dir / "report"
    notes = list(run.notes)
    curves, curve_notes = curve_figures(run.metrics)
    notes += curve_notes
    available = list(run.trajectory_files)
    if steps is None:
        gallery_steps = spread(available, 3)
    else:
        gallery_steps = [s for s in steps if s in run.trajectory_files]
        missing = [s for s in steps if s not in run.trajectory_files]
        if missing:
            notes.append(f"--steps {missing}: no trajectories for those steps (have {_ranges(available)})")
    tables = {}
    for s in spread(available, HISTOGRAM_STEPS):
        table = read_trajectories(run.trajectory_files[s], notes)
        if table is not None and table.num_rows:
            tables[s] = table
    gate = _gate(run)
    histograms = histogram_figures(tables, w_min=gate["w_min"], w_max=gate["w_max"])
    gallery, gallery_notes = build_gallery(run, gallery_steps, prompts)
    notes += gallery_notes
    if not gate["enabled"]:
        notes.append(
            "gate.enabled=false (plain on-policy distillation): every applied weight is 1; the gate/* curves show "
            "what the gate would have said"
        )
    page = Page(
        title=f"V-Zero run report: {run.run_dir.name}",
        subtitle=f"{run.run_dir.resolve()} · {_status(run)}",
        facts=_facts(run, gate),
        notes=notes,
        curves=curves,
        histograms=histograms,
        gallery=gallery,
        gallery_caption=(
            f"Steps {gallery_steps or '(none)'}: per step, up to {prompts} prompts, those whose sampled responses "
            "differ most in mean Δ. Δ = lp_pos − lp_neg per token: the teacher's log-prob of the student's token "
            "with the evidence crop minus with the negative view. Hover a token for its numbers."
        ),
        config_text=run.config_text,
        versions=_versions(run),
        footer=f"written by `vzero report` at {time.strftime('%Y-%m-%d %H:%M:%S')}",
        gate=gate,
    )
    _write(out, page, render_page(page))
    return out / "index.html"


def _versions(run: RunData) -> dict[str, dict[str, str]]:
    if run.versions:
        return {"the run": run.versions, "this report": software_versions()}
    return {"this report (the run recorded none)": software_versions()}


def _gate(run: RunData) -> dict[str, float | bool | str]:
    return {
        "enabled": bool(run.setting("gate.enabled")),
        "level": str(run.setting("gate.level")),
        "w_min": float(run.setting("gate.w_min")),
        "w_max": float(run.setting("gate.w_max")),
    }


def _status(run: RunData) -> str:
    logged = run.metrics[-1]["step"] if run.metrics else 0
    if run.finished:
        return f"finished: {logged} of {run.total_steps} steps"
    return f"in progress or stopped: {logged} of {run.total_steps} steps logged"


def _facts(run: RunData, gate: dict) -> list[tuple[str, str]]:
    s = run.setting
    last = run.metrics[-1] if run.metrics else {}
    gate_text = (
        f"level {gate['level']}, γ {s('gate.gamma')}, α {s('gate.alpha')}, w in [{gate['w_min']}, {gate['w_max']}]"
        if gate["enabled"]
        else "disabled (plain OPD baseline)"
    )
    facts = [
        ("status", _status(run)),
        ("mode", f"{s('mode')} (max staleness {s('max_staleness')})"),
        ("engines", f"rollout {s('rollout.engine')} × {s('rollout.num_samplers')}, teacher {s('teacher.engine')}"),
        ("batch", f"{s('rollout.prompts_per_step')} prompts × n={s('rollout.n')}, max {s('rollout.max_tokens')} tok"),
        ("gate", gate_text),
        ("negative view", f"{s('views.negative_mode')}, margin {s('views.margin')}"),
        ("loss", str(s("loss.mode"))),
        ("student", str(s("student.path"))),
        ("data", str(s("data.path"))),
    ]
    if last:
        facts.append(("last step", f"step {last['step']}: loss {last.get('loss', float('nan')):.4f}"))
        facts.append(("quarantined rows", f"{last.get('data/quarantined', 0):.0f} (quarantine.parquet)"))
    facts.append(("checkpoint", str(run.checkpoint) if run.checkpoint else "none yet"))
    return facts


def _ranges(steps: list[int]) -> str:
    return f"{steps[0]}..{steps[-1]}" if steps else "none"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


def _write(out: Path, page: Page, text: str) -> None:
    for folder, figures in (("curves", page.curves), ("histograms", page.histograms)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for f in figures:
            (out / folder / f"{f.name}.png").write_bytes(f.png)
    if page.gallery:
        (out / "gallery").mkdir(parents=True, exist_ok=True)
    for item in page.gallery:
        for kind, data in item.images.items():
            (out / "gallery" / f"step_{item.step}_{_safe(item.uid)}_{kind}.png").write_bytes(data)
    tmp = out / f".index.html.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / "index.html")
