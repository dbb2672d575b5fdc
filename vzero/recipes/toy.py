"""The controlled toy reproduction: does the contrastive evidence gate help label-free on-policy distillation?

`run_toy(out, plan, work)` does, with every number taken from `ToyPlan`:
1. data     `write_synth` train (seed 1) and held-out eval (seed 2) files. With `context > 0` each row's STUDENT image
            is then cut to a square window `context` x the target's side around the target (target at a random,
            per-row position), and the teacher's two views are precomputed from the ORIGINAL image: `pos_images` =
            the evidence crop, `neg_images` = an equal-size crop of an irrelevant region (`hard_negative_crop`). The
            question, answer and source columns are carried over as Arrow columns, never read here.
            Why a window: measured on the 2-core CPU machine, a tiny (0.7 M) student trained WITH labels on whole
            224 px or 112 px synth images stays at chance after 800 steps (it cannot learn to find a 4-6 % target
            among the clutter in that budget), so a label-free method could not move it either. `--context 0`
            keeps whole images (for the GPU `--preset small` run).
2. teacher  a random-init model of family `arch` (default Qwen2-VL) and size `preset`, fine-tuned WITH answer
            labels on evidence crops (`sft.train_sft`) at `teacher_pixels`; its crop and student-view accuracies are
            reported.
3. student  a copy of the teacher (same weights) looking at its own view at `student_pixels`: it speaks the answer
            format and reads zoomed crops, but is near chance on its view. Only the view differs between teacher and
            student, so the label-free phase measures exactly what the evidence crop adds.
4. label-free training through the real driver (`vzero.driver.train`, local Ray, the users' code path) with the
            teacher as `teacher.model`: `opd` (gate.enabled=false), `vzero-seq` (sequence gate), `vzero-token`
            (token gate); identical steps, prompts and n for each, one run per seed (`cfg.seed`: data order,
            sampling); the teacher and the student's init are shared by all runs.
5. evaluation  every `eval_every` steps' checkpoint on the held-out eval file, student view, greedy
            (`vzero.eval.evaluate`); results.json, results.md (table, verdict with the seed spread), the plot.

Knows nothing about the gate's internals; wall-clock per method is the whole `train()` call (actor start included)
and the mean logged step time.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vzero.checkpoint import latest_checkpoint
from vzero.config import load_config
from vzero.data import schema as S
from vzero.data.synth import write_synth
from vzero.eval.evaluate import evaluate
from vzero.images import decode_rgb, encode_png
from vzero.metrics_log import read_metrics
from vzero.models.families import get_family
from vzero.recipes.report import mean_std, render_markdown, write_plot
from vzero.recipes.sft import train_sft
from vzero.runtime import derive_seed
from vzero.views import downsample_view, hard_negative_crop, positive_view

log = logging.getLogger("vzero")
REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "configs" / "toy-cpu.yaml"
METHODS: dict[str, tuple[str, ...]] = {
    "opd": ("gate.enabled=false",),  # plain on-policy distillation toward the crop-view teacher
    "vzero-seq": ("gate.enabled=true", "gate.level=sequence"),  # the authors' gate
    "vzero-token": ("gate.enabled=true", "gate.level=token"),  # ours
}


@dataclass(frozen=True)
class ToyPlan:
    """Sizes of one toy reproduction (defaults: the full CPU run, ~25 min on 2 cores)."""

    preset: str = "tiny"
    arch: str = "qwen2_vl"  # model family (vzero.models.families); pixel budgets below are in its resize steps
    device: str = "cpu"
    seeds: tuple[int, ...] = (0, 1, 2)
    image_size: int = 336
    context: float = 3.0  # student window side / target side; 0 = whole images
    margin: float = 0.25  # evidence-crop padding (fraction of the box side), teacher views and crop eval
    n_train: int = 1024
    n_eval: int = 300
    teacher_steps: int = 1200
    teacher_lr: float = 1e-3
    teacher_pixels: int = 112 * 112  # 16 image tokens per crop
    student_pixels: int = 56 * 56  # 4 image tokens per window: fine detail is lost, colour survives
    steps: int = 200
    prompts_per_step: int = 8
    n: int = 8
    lr: float = 1e-4
    eval_every: int = 25
    engine: str = "auto"  # rollout + teacher engines (auto = vLLM where installed)
    eval_engine: str = "transformers"  # tiny checkpoints: no engine start-up cost per checkpoint


def plan_for(
    preset: str = "tiny", *, smoke: bool = False, device: str = "cpu", arch: str = "qwen2_vl", **overrides: Any
) -> ToyPlan:
    """The full CPU plan, the smoke plan (a couple of minutes) or the `small` GPU plan; keyword overrides win.

    Pixel budgets are image-token budgets: 4 x 4 tokens per crop and 2 x 2 per student view (8 x 8 and 4 x 4 for
    `small`), i.e. 112 / 56 px sides for Qwen2-VL's 28-px resize step, 128 / 64 px for the Qwen3 families' 32."""
    family = get_family(arch)
    plan = ToyPlan(
        preset=preset,
        arch=arch,
        device=device,
        teacher_pixels=family.pixels_for_tokens(4),
        student_pixels=family.pixels_for_tokens(2),
    )
    if smoke:
        plan = replace(
            plan, seeds=(0,), n_train=48, n_eval=24, teacher_steps=20, steps=2, prompts_per_step=2, n=2,
            eval_every=2, engine="transformers",
        )  # fmt: skip
    elif preset == "small":
        plan = replace(
            plan, n_train=4096, n_eval=1000, teacher_steps=4000, teacher_pixels=family.pixels_for_tokens(8),
            student_pixels=family.pixels_for_tokens(4), steps=300, prompts_per_step=16, lr=2e-4,
        )  # fmt: skip
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    return replace(plan, eval_every=min(plan.eval_every, plan.steps))  # at least the final checkpoint is evaluated


# -- 1. data ------------------------------------------------------------------------------------------------------
def write_context_view(raw: Path, out: Path, *, context: float, margin: float, seed: int) -> Path:
    """`raw` with each student image cut to a `context` x target-side window, teacher views precomputed (see top)."""
    table = pq.read_table(raw)
    images, boxes, pos, neg = [], [], [], []
    cols = table.select([S.ID, S.IMAGE, S.EVIDENCE_BOX, S.NEGATIVE_BOX]).to_pylist()
    for row in cols:
        full = decode_rgb(row[S.IMAGE])
        x0, y0, x1, y1 = row[S.EVIDENCE_BOX]
        side = max(x1 - x0, y1 - y0)
        win = min(max(round(context * side), int(side) + 2), *full.size)
        rng = np.random.default_rng(derive_seed(seed, "window", row[S.ID]))
        ox, oy = rng.uniform(0, win - (x1 - x0)), rng.uniform(0, win - (y1 - y0))
        wx = int(min(max(0, x0 - ox), full.width - win))
        wy = int(min(max(0, y0 - oy), full.height - win))
        images.append(encode_png(full.crop((wx, wy, wx + win, wy + win))))
        boxes.append([x0 - wx, y0 - wy, x1 - wx, y1 - wy])
        p = positive_view(full, (x0, y0, x1, y1), margin=margin)
        n = hard_negative_crop(
            full, (x0, y0, x1, y1), seed=seed, uid=row[S.ID], margin=margin, negative_box=row[S.NEGATIVE_BOX]
        )
        pos.append(encode_png(p))
        neg.append(encode_png(n if n is not None else downsample_view(p)))
    replaced = {
        S.IMAGE: pa.array(images, pa.binary()),
        S.EVIDENCE_BOX: pa.array(boxes, pa.list_(pa.float64())),
        S.NEGATIVE_BOX: pa.nulls(len(cols), pa.list_(pa.float64())),
        S.POS_IMAGES: pa.array([[b] for b in pos], pa.list_(pa.binary())),
        S.NEG_IMAGES: pa.array([[b] for b in neg], pa.list_(pa.binary())),
    }
    for name, column in replaced.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=S.DEFAULT_ROW_GROUP_SIZE)
    os.replace(tmp, out)
    return out


PREP_FIELDS = (
    "preset", "arch", "device", "image_size", "context", "margin", "n_train", "n_eval", "teacher_steps", "teacher_lr",
    "teacher_pixels",
)  # fmt: skip


def check_work(work: Path, plan: ToyPlan) -> None:
    """Data and teacher in `work` are reused only for the plan they were made for (recorded in work/plan.json)."""
    path, want = work / "plan.json", {k: getattr(plan, k) for k in PREP_FIELDS}
    if path.exists():
        have = json.loads(path.read_text())
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(
                f"{work} holds data/teacher made for another plan (field: (there, now)) {diff}; "
                "pass another --work or delete that directory"
            )
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(want, indent=2))


def make_data(work: Path, plan: ToyPlan) -> tuple[Path, Path]:
    """(train, eval) Parquet files for the plan (written once; reused when present)."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, seed in (("train", plan.n_train, 1), ("eval", plan.n_eval, 2)):
        raw = data / f"{name}-raw.parquet"
        if not raw.exists():
            write_synth(raw, n=n, seed=seed, image_size=plan.image_size)
        path = data / f"{name}.parquet"
        if plan.context <= 0:
            path = raw
        elif not path.exists():
            write_context_view(raw, path, context=plan.context, margin=plan.margin, seed=seed)
        paths.append(path)
    return paths[0], paths[1]


# -- 2. teacher ---------------------------------------------------------------------------------------------------
def make_teacher(work: Path, plan: ToyPlan, train: Path) -> tuple[Path, dict[str, Any]]:
    from vzero.models.tiny import build_model

    init, teacher = work / "models" / "init", work / "models" / "teacher"
    if not (init / "config.json").exists():
        build_model(init, arch=plan.arch, preset=plan.preset, seed=0, device=plan.device)
    info_path = teacher / "sft.json"
    if not info_path.exists():
        res = train_sft(
            init, teacher, train, view="crop", steps=plan.teacher_steps, lr=plan.teacher_lr, seed=0,
            min_pixels=plan.teacher_pixels, max_pixels=plan.teacher_pixels, margin=plan.margin, device=plan.device,
        )  # fmt: skip
        info = {
            "steps": plan.teacher_steps,
            "examples": res.examples,
            "invalid": res.invalid,
            "first_loss": res.losses[0],
            "final_loss": statistics.fmean(res.losses[-20:]),
            "seconds": res.seconds,
        }
        info_path.write_text(json.dumps(info, indent=2))
    return teacher, json.loads(info_path.read_text())


# -- 4. label-free runs -------------------------------------------------------------------------------------------
def run_overrides(plan: ToyPlan, method: str, seed: int, model: Path, train: Path, out: Path) -> list[str]:
    """`key=value` overrides of configs/toy-cpu.yaml for one run (also printed as the exact `vzero train` line)."""
    ov = [
        f"output_dir={out}", f"seed={seed}", f"steps={plan.steps}", f"data.path={train}",
        f"student.path={model}", f"student.min_pixels={plan.student_pixels}",
        f"student.max_pixels={plan.student_pixels}", f"teacher.model.path={model}",
        f"teacher.model.min_pixels={plan.teacher_pixels}", f"teacher.model.max_pixels={plan.teacher_pixels}",
        f"rollout.engine={plan.engine}", f"teacher.engine={plan.engine}",
        f"rollout.prompts_per_step={plan.prompts_per_step}", f"rollout.n={plan.n}", f"learner.lr={plan.lr}",
        f"views.margin={plan.margin}", f"checkpoint.every={plan.eval_every}",
        f"checkpoint.keep_last={plan.steps // plan.eval_every + 1}", *METHODS[method],
    ]  # fmt: skip
    if plan.device == "cuda":  # one GPU shared by sampler, teacher and learner
        ov += ["ray.num_gpus=1", "rollout.resources.num_gpus=0.3", "teacher.resources.num_gpus=0.3"]
        ov += ["learner.resources.num_gpus=0.3", "rollout.vllm.gpu_memory_utilization=0.25"]
        ov += ["teacher.vllm.gpu_memory_utilization=0.25"]
    return ov


def finished_run(overrides: list[str]) -> tuple[Path, float] | None:
    """(run dir, wall seconds) of a run that finished earlier with exactly these overrides, else None."""
    out = Path(load_config(BASE_CONFIG, overrides).output_dir)
    done = out / "wall.json"
    if latest_checkpoint(out / "checkpoints") is not None and done.exists():
        record = json.loads(done.read_text())
        if record.get("overrides") == overrides:
            return out, record["seconds"]
    return None


def train_run(overrides: list[str]) -> tuple[Path, float]:
    """One `vzero train` through the real driver; returns (run dir, wall seconds incl. actor start-up).

    A run that finished earlier with exactly these overrides is reused; anything else in its directory is removed."""
    from vzero.driver import train

    if (earlier := finished_run(overrides)) is not None:
        return earlier
    cfg = load_config(BASE_CONFIG, overrides)
    out = Path(cfg.output_dir)
    done = out / "wall.json"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"seconds": seconds, "overrides": overrides}))
    return out, seconds


# -- 5. evaluation ------------------------------------------------------------------------------------------------
def _eval(plan: ToyPlan, model: Path, data: Path, views: str = "full") -> dict[str, Any]:
    pixels = plan.student_pixels if views == "full" else plan.teacher_pixels
    return evaluate(
        model, data, views=views, engine=plan.eval_engine, min_pixels=pixels, max_pixels=pixels,
        margin=plan.margin, max_tokens=4, device=plan.device,
    )  # fmt: skip


def eval_curve(plan: ToyPlan, run: Path, data: Path, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy of the init (step 0) and of every checkpoint of `run`, cached in `run/curve.json`."""
    cache = run / "curve.json"
    if cache.exists():
        return json.loads(cache.read_text())
    points = [{"step": 0, "accuracy": base["accuracy"], "by_source": base["by_source"]}]
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        res = _eval(plan, ckpt / "model", data)
        step = int(ckpt.name.split("_")[1])
        points.append({"step": step, "accuracy": res["accuracy"], "by_source": res["by_source"]})
    cache.write_text(json.dumps(points))
    return points


def _gate_summary(run: Path) -> dict[str, float]:
    metrics = read_metrics(run / "metrics.jsonl")
    keys = ("gate/weight_mean", "gate/frac_at_w_min", "gate/frac_delta_pos", "gate/delta_mean", "loss")
    # With the gate off (opd) the gate's statistics are logged as gate_would/* (gate/weight_* are the applied 1s).
    out = {k: statistics.fmean(m.get(k.replace("gate/", "gate_would/"), m.get(k)) for m in metrics) for k in keys}
    out["step_seconds_mean"] = statistics.fmean(m["step/seconds"] for m in metrics)
    return out


def gate_vs_correctness(run: Path, train: Path, tokenizer_dir: Path) -> dict[str, float]:
    """Does the gate's contrast pick out correct answers? Over all of a run's logged trajectories: the fraction of
    sampled answers that are correct, and the mean sequence-gate weight (recomputed from the logged teacher log-probs
    with the paper's defaults, so opd runs get what the gate WOULD have said) of correct vs wrong samples."""
    import torch

    from gating.gate import evidence_weights
    from vzero.eval.evaluate import iter_labeled, normalize_answer
    from vzero.models.loading import load_processor

    tok = load_processor(tokenizer_dir).tokenizer
    gold = {r.prompt.uid: normalize_answer(r.answer) for r in iter_labeled(train) if not isinstance(r, str)}
    right, wrong = [], []
    for path in sorted((run / "trajectories").glob("step_*.parquet")):
        rows = pq.read_table(path, columns=["uid", "response_ids", "lp_pos", "lp_neg"]).to_pylist()
        T = max(len(r["lp_pos"]) for r in rows)
        pos, neg, mask = torch.zeros(len(rows), T), torch.zeros(len(rows), T), torch.zeros(len(rows), T)
        for i, r in enumerate(rows):
            k = len(r["lp_pos"])
            pos[i, :k], neg[i, :k], mask[i, :k] = torch.tensor(r["lp_pos"]), torch.tensor(r["lp_neg"]), 1.0
        w, _ = evidence_weights(pos, neg, mask, [r["uid"] for r in rows], gamma=1.0, alpha=0.5, w_min=0.0, w_max=2.0)
        for r, wi in zip(rows, w.tolist(), strict=True):
            ok = normalize_answer(tok.decode(r["response_ids"], skip_special_tokens=True)) == gold[r["uid"]]
            (right if ok else wrong).append(wi)
    n = len(right) + len(wrong)
    return {
        "sample_accuracy": len(right) / n if n else 0.0,
        "weight_correct": statistics.fmean(right) if right else None,  # None: no such sample (JSON has no NaN)
        "weight_wrong": statistics.fmean(wrong) if wrong else None,
    }


def run_toy(out: Path, plan: ToyPlan, work: Path, command: str = "") -> dict[str, Any]:
    """Run steps 1-5 (see the module docstring) and write results.json / results.md / accuracy_vs_step.png to `out`."""
    import ray

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    check_work(work, plan)
    train, held_out = make_data(work, plan)
    teacher, sft = make_teacher(work, plan, train)
    base = _eval(plan, teacher, held_out, "full")
    teacher_eval = {"crop": _eval(plan, teacher, held_out, "crop"), "full": base}
    runs: dict[str, dict[str, Any]] = {m: {} for m in METHODS}
    commands = []
    own_cluster = not ray.is_initialized()  # the first run starts a local cluster; later runs reuse it
    try:
        for seed in plan.seeds:
            for method in METHODS:
                ov = run_overrides(plan, method, seed, teacher, train, work / "runs" / f"{method}-seed{seed}")
                commands.append(f"vzero train --config {BASE_CONFIG.relative_to(REPO)} " + " ".join(ov))
                run, wall = train_run(ov)
                curve = eval_curve(plan, run, held_out, base)
                runs[method][str(seed)] = {
                    "final": curve[-1]["accuracy"],
                    "final_by_source": curve[-1]["by_source"],
                    "curve": curve,
                    "wall_seconds": wall,
                    **_gate_summary(run),
                    **gate_vs_correctness(run, train, teacher),
                }
    finally:
        if own_cluster and ray.is_initialized():
            ray.shutdown()
    summary = {
        m: {
            "accuracy": mean_std([r["final"] for r in per.values()]),
            "wall_seconds": mean_std([r["wall_seconds"] for r in per.values()]),
            "step_seconds": mean_std([r["step_seconds_mean"] for r in per.values()]),
        }
        for m, per in runs.items()
    }
    results = {
        "plan": asdict(plan),
        "command": command,
        "train_commands": commands,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, device {plan.device}",
        "teacher": {"sft": sft, "crop_accuracy": teacher_eval["crop"], "full_accuracy": teacher_eval["full"]},
        "base": base,
        "runs": runs,
        "summary": summary,
        "total_seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_plot(out / "accuracy_vs_step.png", results)
    (out / "results.md").write_text(render_markdown(results))
    return results
