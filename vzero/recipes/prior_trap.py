"""The prior-trap experiment: does the evidence gate stop on-policy distillation from copying a teacher's prior?

`run_prior_trap(out, plan, work)` does, with every number taken from `TrapPlan`:
1. data      colour rows of the synthetic task, half with the control question, half with the TRAP question
             (`prior_trap_data`): a teacher-SFT set (seed 3), label-free prompts (seed 1), held-out rows (seed 2).
             Student windows and the teacher's two precomputed views as in the toy (`toy.write_context_view`).
2. teachers  phase 1 (clean): a random-init Qwen2-VL fine-tuned WITH labels on evidence crops of the SFT set
             (`sft.train_sft`); this checkpoint is the STUDENT's init: it speaks the answer format, reads crops,
             has no prior. Phase 2 (biased): phase 1 continued on the same crops with `bias_rate` of the trap rows'
             labels replaced by `trap_answer` (P) whatever the image: the TEACHER. It learns to say P on the trap
             question with modest probability when the evidence is there, and more when it is not.
3. premises  measured on the held-out rows before any comparison run (`prior_trap_premises`): teacher p(P) on
             crop vs negative view, Δ per answer class, the student's P-rate and accuracy at init, and the gate
             weights the real `evidence_weights` gives P vs correct samples the student would draw. They go into
             results.json / results.md; `--require-premises` stops the recipe when one fails.
4. runs      label-free, through the real driver (`toy.train_run`: configs/toy-cpu.yaml + overrides) with the
             biased teacher as `teacher.model` and the phase-1 student, one run per (method, seed), identical
             steps, prompts and n for every method. `METHODS` below; `k3` runs use `loss.mode=k3`; the `best`
             gate for the k3 comparison is picked after the k1 runs (lowest mean final trap P-rate among the gated
             k1 methods, the mechanism under test), and recorded.
5. evaluation  every checkpoint on the held-out rows, student view, greedy: accuracy and P-rate per family
             (`family_scores`); gate diagnostics from the logged trajectories (`prior_trap_diagnostics`); report
             (`prior_trap_report`).

Finished runs and evaluations are reused (run dirs under work/runs, `curve.json` per run), so a re-run continues.
Knows nothing about the gate's internals beyond the config keys.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vzero.recipes.prior_trap_cluster import cpu_threads, git_commit, start_cluster, train_with_retries
from vzero.recipes.prior_trap_data import (
    DEFAULT_TRAP_ANSWER,
    answer_prior_stats,
    write_biased_labels,
    write_colour_rows,
)
from vzero.recipes.toy import BASE_CONFIG, REPO, write_context_view

log = logging.getLogger("vzero")

GATE_ON = ("gate.enabled=true",)
METHODS: dict[str, tuple[str, ...]] = {
    "opd": ("gate.enabled=false",),
    "seq-a0.5": (*GATE_ON, "gate.level=sequence", "gate.alpha=0.5"),
    "seq-a1": (*GATE_ON, "gate.level=sequence", "gate.alpha=1.0"),
    "seq-a2": (*GATE_ON, "gate.level=sequence", "gate.alpha=2.0"),
    "token-a1": (*GATE_ON, "gate.level=token", "gate.alpha=1.0"),
    "shuffled-a1": (*GATE_ON, "gate.level=sequence", "gate.alpha=1.0", "gate.shuffle_control=true"),
    "opd-k3": ("gate.enabled=false", "loss.mode=k3"),
}
GATED_K1 = ("seq-a0.5", "seq-a1", "seq-a2", "token-a1")  # candidates for the k3 comparison's "best gate"
BEST_K3 = "best-k3"  # METHODS[best] + loss.mode=k3, resolved after the k1 runs
SMOKE_METHODS = ("opd", "token-a1", "shuffled-a1", BEST_K3)  # CI: gate off / token / sequence (shuffled) / k3


@dataclass(frozen=True)
class TrapPlan:
    """Sizes of one prior-trap experiment (defaults: the full CPU run)."""

    preset: str = "tiny"
    device: str = "cpu"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    image_size: int = 336
    context: float = 3.0  # student window side / target side (the toy's partly resolvable view)
    margin: float = 0.25
    n_teacher: int = 1024  # rows the teachers are fine-tuned on (never seen by the label-free runs)
    n_train: int = 1024  # label-free prompts
    n_eval: int = 1000  # held-out rows
    trap_answer: str = DEFAULT_TRAP_ANSWER
    bias_rate: float = 0.4  # share of trap-row labels replaced by trap_answer in phase 2
    teacher_steps: int = 800  # phase 1, clean labels
    bias_steps: int = 400  # phase 2, biased labels
    teacher_lr: float = 1e-3
    bias_lr: float = 5e-4
    teacher_pixels: int = 112 * 112
    student_pixels: int = 56 * 56
    steps: int = 100
    prompts_per_step: int = 8
    n: int = 8
    lr: float = 1e-4
    eval_every: int = 20
    engine: str = "transformers"  # rollout + teacher; tiny models on CPU: no vLLM engine start-up per run
    eval_engine: str = "transformers"
    methods: tuple[str, ...] = (*METHODS, BEST_K3)  # run in this order; best-k3 last (it needs the k1 results)
    threads: int = 1  # torch threads per actor and in-process on CPU (see below)


def plan_for(preset: str = "tiny", *, smoke: bool = False, device: str = "cpu", **overrides: Any) -> TrapPlan:
    """The full CPU plan, the smoke plan (CI, about a minute) or the `small` GPU plan; keyword overrides win."""
    plan = TrapPlan(preset=preset, device=device)
    if smoke:
        plan = replace(
            plan, seeds=(0,), n_teacher=32, n_train=16, n_eval=24, teacher_steps=6, bias_steps=4, steps=2,
            prompts_per_step=2, n=4, eval_every=1, engine="transformers", methods=SMOKE_METHODS,
        )  # fmt: skip
    elif preset == "small":
        plan = replace(
            plan, n_teacher=4096, n_train=4096, teacher_steps=4000, bias_steps=2000, teacher_pixels=224 * 224,
            student_pixels=112 * 112, steps=300, prompts_per_step=16, lr=2e-4, engine="auto", threads=2,
        )  # fmt: skip
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    unknown = [m for m in plan.methods if m not in METHODS and m != BEST_K3]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {[*METHODS, BEST_K3]}")
    return replace(plan, eval_every=min(plan.eval_every, plan.steps))


PREP_FIELDS = (
    "preset", "device", "image_size", "context", "margin", "n_teacher", "n_train", "n_eval", "trap_answer",
    "bias_rate", "teacher_steps", "bias_steps", "teacher_lr", "bias_lr", "teacher_pixels",
)  # fmt: skip


def check_work(work: Path, plan: TrapPlan) -> None:
    """Data and teachers in `work` are reused only for the plan they were made for (work/plan.json)."""
    path, want = work / "plan.json", {k: getattr(plan, k) for k in PREP_FIELDS}
    if path.exists():
        have = json.loads(path.read_text())
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(
                f"{work} holds data/teachers made for another plan (field: (there, now)) {diff}; "
                "pass another --work or delete that directory"
            )
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(want, indent=2))


# -- 1. data ------------------------------------------------------------------------------------------------------
def make_data(work: Path, plan: TrapPlan) -> dict[str, Path]:
    """{sft, sft_biased, train, eval} Parquet files (written once; reused when present)."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, n, seed in (("sft", plan.n_teacher, 3), ("train", plan.n_train, 1), ("eval", plan.n_eval, 2)):
        raw, path = data / f"{name}-raw.parquet", data / f"{name}.parquet"
        if not raw.exists():
            write_colour_rows(raw, n, seed, plan.image_size)
        if not path.exists():
            write_context_view(raw, path, context=plan.context, margin=plan.margin, seed=seed)
        paths[name] = path
    biased = data / "sft-biased.parquet"
    if not biased.exists():
        write_biased_labels(paths["sft"], biased, answer=plan.trap_answer, rate=plan.bias_rate, seed=3)
    paths["sft_biased"] = biased
    return paths


# -- 2. teachers --------------------------------------------------------------------------------------------------
def _sft(plan: TrapPlan, init: Path, out: Path, data: Path, steps: int, lr: float) -> dict[str, Any]:
    from vzero.recipes.sft import train_sft

    info_path = out / "sft.json"
    if not info_path.exists():
        res = train_sft(
            init, out, data, view="crop", steps=steps, lr=lr, seed=0, min_pixels=plan.teacher_pixels,
            max_pixels=plan.teacher_pixels, margin=plan.margin, device=plan.device,
        )  # fmt: skip
        info = {
            "init": str(init),
            "data": str(data),
            "steps": steps,
            "lr": lr,
            "examples": res.examples,
            "invalid": res.invalid,
            "first_loss": res.losses[0],
            "final_loss": statistics.fmean(res.losses[-20:]),
            "seconds": res.seconds,
        }
        info_path.write_text(json.dumps(info, indent=2))
    return json.loads(info_path.read_text())


def make_models(work: Path, plan: TrapPlan, data: dict[str, Path]) -> dict[str, Any]:
    """init -> clean (phase 1: the student) -> biased (phase 2: the teacher); returns paths and SFT records."""
    from vzero.models.tiny import build_model

    models = work / "models"
    init, clean, biased = models / "init", models / "clean", models / "biased"
    if not (init / "config.json").exists():
        build_model(init, arch="qwen2_vl", preset=plan.preset, seed=0, device=plan.device)
    clean_info = _sft(plan, init, clean, data["sft"], plan.teacher_steps, plan.teacher_lr)
    biased_info = _sft(plan, clean, biased, data["sft_biased"], plan.bias_steps, plan.bias_lr)
    return {"student": clean, "teacher": biased, "sft": {"clean": clean_info, "biased": biased_info}}


# -- 3. premises --------------------------------------------------------------------------------------------------
def _eval(plan: TrapPlan, model: Path, data: Path, views: str = "full") -> dict[str, Any]:
    from vzero.eval.evaluate import evaluate
    from vzero.recipes.prior_trap_premises import family_scores

    pixels = plan.student_pixels if views == "full" else plan.teacher_pixels
    res = evaluate(
        model, data, views=views, engine=plan.eval_engine, min_pixels=pixels, max_pixels=pixels, margin=plan.margin,
        max_tokens=4, device=plan.device, return_predictions=True,
    )  # fmt: skip
    return family_scores(res.pop("predictions"), plan.trap_answer) | {"seconds": res["seconds"]}


def measure_premises(work: Path, plan: TrapPlan, data: dict[str, Path], models: dict[str, Any]) -> dict[str, Any]:
    """Every premise number (cached in work/premises.json): see `prior_trap_premises`."""
    from vzero.data.synth import COLORS
    from vzero.recipes.prior_trap_premises import answer_table, premises

    cache = work / "premises.json"
    if cache.exists():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    cands = list(COLORS)
    kw = {"candidates": cands, "device": plan.device}
    t_crop = answer_table(models["teacher"], data["eval"], view="crop", pixels=plan.teacher_pixels, **kw)
    t_neg = answer_table(models["teacher"], data["eval"], view="neg", pixels=plan.teacher_pixels, **kw)
    s_view = answer_table(models["student"], data["eval"], view="full", pixels=plan.student_pixels, **kw)
    student = _eval(plan, models["student"], data["eval"])
    res = premises(t_crop, t_neg, s_view, student, plan.trap_answer, n=plan.n)
    res["greedy"] = {
        "teacher_crop": _eval(plan, models["teacher"], data["eval"], "crop"),
        "teacher_full": _eval(plan, models["teacher"], data["eval"], "full"),
        "student_crop": _eval(plan, models["student"], data["eval"], "crop"),
        "student_full": student,
    }
    res["label_prior"] = {
        "sft": answer_prior_stats(data["sft"], plan.trap_answer),
        "sft_biased": answer_prior_stats(data["sft_biased"], plan.trap_answer),
    }
    res["seconds"] = time.perf_counter() - t0
    cache.write_text(json.dumps(res, indent=2))
    return res


# -- 4. label-free runs -------------------------------------------------------------------------------------------
def method_overrides(method: str, best: str | None = None) -> tuple[str, ...]:
    """The gate/loss keys of `method`; `best-k3` is the best gated k1 method with `loss.mode=k3`."""
    if method == BEST_K3:
        if best is None:
            raise ValueError(f"{BEST_K3} needs the best gated k1 method, chosen after the k1 runs")
        return (*METHODS[best], "loss.mode=k3")
    return METHODS[method]


def run_overrides(
    plan: TrapPlan, method: str, seed: int, models: dict[str, Any], train: Path, out: Path, best: str | None = None
) -> list[str]:
    """`key=value` overrides of configs/toy-cpu.yaml for one run (also recorded as the exact `vzero train` line)."""
    ov = [
        f"output_dir={out}", f"seed={seed}", f"steps={plan.steps}", f"data.path={train}",
        f"student.path={models['student']}", f"student.min_pixels={plan.student_pixels}",
        f"student.max_pixels={plan.student_pixels}", f"teacher.model.path={models['teacher']}",
        f"teacher.model.min_pixels={plan.teacher_pixels}", f"teacher.model.max_pixels={plan.teacher_pixels}",
        f"rollout.engine={plan.engine}", f"teacher.engine={plan.engine}",
        f"rollout.prompts_per_step={plan.prompts_per_step}", f"rollout.n={plan.n}", f"learner.lr={plan.lr}",
        f"views.margin={plan.margin}", f"checkpoint.every={plan.eval_every}",
        f"checkpoint.keep_last={plan.steps // plan.eval_every + 1}", *method_overrides(method, best),
    ]  # fmt: skip
    if plan.device == "cpu":  # configs/toy-cpu.yaml gives each actor 2 CPUs = 2 torch threads; see `cpu_threads`
        ov += [f"{role}.resources.num_cpus={plan.threads}" for role in ("rollout", "teacher", "learner")]
    if plan.device == "cuda":  # one GPU shared by sampler, teacher and learner (as the toy's GPU form)
        ov += ["ray.num_gpus=1", "rollout.resources.num_gpus=0.3", "teacher.resources.num_gpus=0.3"]
        ov += ["learner.resources.num_gpus=0.3", "rollout.vllm.gpu_memory_utilization=0.25"]
        ov += ["teacher.vllm.gpu_memory_utilization=0.25"]
    return ov


def eval_curve(plan: TrapPlan, run: Path, data: Path, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy and P-rate per family of the init (step 0) and of every checkpoint, cached in `run/curve.json`."""
    cache = run / "curve.json"
    if cache.exists():
        return json.loads(cache.read_text())
    points = [{"step": 0, **{k: base[k] for k in ("accuracy", "by_family", "p_rate")}}]
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        res = _eval(plan, ckpt / "model", data)
        step = int(ckpt.name.split("_")[1])
        points.append({"step": step, **{k: res[k] for k in ("accuracy", "by_family", "p_rate")}})
    cache.write_text(json.dumps(points))
    return points


def pick_best(runs: dict[str, dict[str, Any]]) -> str:
    """The gated k1 method with the lowest mean final trap P-rate (ties: higher mean final trap accuracy)."""
    from vzero.recipes.prior_trap_data import TRAP

    def key(m: str) -> tuple[float, float]:
        per = runs[m].values()
        return (
            statistics.fmean(r["curve"][-1]["p_rate"][TRAP] for r in per),
            -statistics.fmean(r["curve"][-1]["by_family"][TRAP] for r in per),
        )

    return min((m for m in GATED_K1 if runs.get(m)), key=key)


def run_prior_trap(
    out: Path,
    plan: TrapPlan,
    work: Path,
    command: str = "",
    *,
    require_premises: bool = False,
    report_only: bool = False,
) -> dict[str, Any]:
    """Steps 1-5 (module docstring); writes results.json, results.md and the plots to `out`. `report_only`: train
    nothing, report the runs that finished (the others are listed under `missing_runs`)."""
    import ray

    from vzero.recipes.prior_trap_diagnostics import run_diagnostics
    from vzero.recipes.prior_trap_report import write_report
    from vzero.recipes.toy import finished_run

    t_start = time.perf_counter()
    cpu_threads(plan.device, plan.threads)
    out.mkdir(parents=True, exist_ok=True)
    check_work(work, plan)
    data = make_data(work, plan)
    models = make_models(work, plan, data)
    prem = measure_premises(work, plan, data, models)
    failed = [k for k, ok in prem["checks"].items() if not ok]
    if failed and require_premises:
        raise RuntimeError(f"premise(s) failed: {failed}; see {work / 'premises.json'}")
    base = prem["student_init_greedy"]
    runs: dict[str, dict[str, Any]] = {m: {} for m in plan.methods}
    missing: list[str] = []
    best = None
    own_cluster = not ray.is_initialized()
    try:
        if own_cluster and not report_only:  # one local cluster for all runs (the driver reuses a connected one)
            start_cluster(run_overrides(plan, "opd", 0, models, data["train"], work / "runs" / "cluster"))
        # Seeds outer, so an interrupted experiment still has complete seeds; best-k3 needs every k1 result first.
        order = [(m, seed) for seed in plan.seeds for m in plan.methods if m != BEST_K3]
        order += [(BEST_K3, seed) for seed in plan.seeds if BEST_K3 in plan.methods]
        for method, seed in order:
            if method == BEST_K3 and best is None:
                best = pick_best(runs)
            name = f"{best}-k3" if method == BEST_K3 else method
            run_dir = work / "runs" / f"{name}-seed{seed}"
            ov = run_overrides(plan, method, seed, models, data["train"], run_dir, best)
            train_command = f"vzero train --config {BASE_CONFIG.relative_to(REPO)} " + " ".join(ov)
            if report_only and finished_run(ov) is None:
                missing.append(f"{method}/{seed}")
                continue
            run, wall = train_with_retries(ov)
            runs.setdefault(method, {})[str(seed)] = {
                "run_dir": str(run),
                "command": train_command,
                "wall_seconds": wall,
                "curve": eval_curve(plan, run, data["eval"], base),
                "diagnostics": run_diagnostics(run, data["train"], plan.trap_answer, plan.student_pixels),
            }
            log.info("prior-trap %s seed %d done (%.0f s)", method, seed, wall)
    finally:
        if own_cluster and ray.is_initialized():
            ray.shutdown()
    results = {
        "plan": asdict(plan),
        "command": command,
        "git_commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, device {plan.device}",
        "models": {"student": str(models["student"]), "teacher": str(models["teacher"]), "sft": models["sft"]},
        "premises": prem,
        "premises_failed": failed,
        "methods": {m: list(method_overrides(m, best)) for m in plan.methods},
        "best_gate_for_k3": best,
        "runs": runs,
        "missing_runs": missing,
        "total_seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out, results)
    return results
