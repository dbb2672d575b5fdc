"""Typed configuration for a V-Zero job: one pydantic model per concern, composed into `TrainConfig`.

Loaded from YAML (`load_config(path, overrides)`), overridable on the command line as `key.sub=value` (the value
is parsed as YAML, so `rollout.n=4`, `gate.level=token`, `ray.address=null` work), validated up front: unknown keys
are rejected with a "did you mean" hint and every error is reported in one message naming the field. A default lives
only here; code reads attributes directly (`cfg.rollout.n`), never `getattr(..., default)`.

Knows nothing about Ray, models or files beyond reading the YAML it is given.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vzero.teacher_prompt import CROP, DEFAULT_TEMPLATE, IMAGE, Context, count_markers

EngineKind = Literal["auto", "vllm", "transformers"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
# Seeds reach numpy (np.random.seed: < 2**32, non-negative) and vLLM engines as `seed + rank`: 31 bits fit all of them.
MAX_SEED = 2**31 - 1


class _Strict(BaseModel):
    """Base: unknown keys are errors, assignments are validated, attribute docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class BuildSpec(_Strict):
    """How to build a random-init model when `path` holds none (demos, tests, benchmarks)."""

    arch: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"] = "qwen2_vl"
    """Real architecture to instantiate: the Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5 family (the authors train
    Qwen3.5; differences between families: vzero/models/families.py)."""
    preset: Literal["tiny", "small", "3b", "4b"] = "tiny"
    """Size: `tiny` (CPU tests), `small` (toy experiments), `3b` (Qwen2-VL-2B / Qwen2.5-VL-3B shapes) or `4b`
    (Qwen3-VL-4B / Qwen3.5-4B shapes, the authors' student): GPU benchmarks."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the random init; the same seed gives the same weights."""


class ChatOptions(_Strict):
    """How prompts are rendered with the model's chat template (the same for sampling, teacher replay, the learner
    (which trains on the sampler's prompt ids) and evaluation)."""

    system_prompt: str | None = None
    """System turn text; unset = no system turn (the authors: none; their `<answer>`-tag system prompt is off).
    Templates may add their own default when there is none: Qwen2-VL / Qwen2.5-VL insert "You are a helpful
    assistant.", Qwen3-VL / Qwen3.5 add nothing."""
    enable_thinking: bool = False
    """Let the model reason first (Qwen3.5: the generation prompt opens a `<think>` block). The authors: false (the
    prompt then ends with an empty `<think>\n\n</think>\n\n`). Templates without thinking ignore it."""


class ModelSource(_Strict):
    """A model directory (HF format, safetensors) and how to view images for it."""

    path: str = "runs/models/tiny-qwen2vl"
    """Directory with config.json, *.safetensors, tokenizer and processor files (a user's checkpoint or a built one)."""
    build: BuildSpec | None = None
    """If set and `path` has no config.json, build a random-init model there first. Leave unset for real models."""
    dtype: DType = "auto"
    """Parameter dtype; `auto` = bfloat16 on GPU, float32 on CPU."""
    trust_remote_code: bool = False
    """Allow model code from the directory to run. Off by default: only enable for directories you trust."""
    min_pixels: int = Field(56 * 56, gt=0)
    """Lower bound on the image area fed to the vision tower (the processor upsamples smaller images)."""
    max_pixels: int = Field(448 * 448, gt=0)
    """Upper bound on the image area fed to the vision tower (pixel budget; larger images are downscaled)."""
    chat: ChatOptions = ChatOptions()
    """Chat-template options for prompts to this model."""

    @model_validator(mode="after")
    def _pixels_ordered(self) -> ModelSource:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")
        return self


class ActorResources(_Strict):
    """Ray resources for one actor; fractional GPUs let sampler, teacher and learner share one GPU."""

    num_cpus: float = Field(1.0, ge=0)
    """Logical CPUs reserved per actor (also its torch thread count, at least 1)."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per actor: 0 = CPU, a fraction to colocate on one GPU, an integer for whole GPUs."""
    max_restarts: int = Field(2, ge=-1)
    """How many times Ray restarts the actor after it dies (-1 = forever); the driver then retries its work."""
    custom: dict[str, float] = {}
    """Custom Ray resources per actor, e.g. `{vzero_learner: 1}`: pins a role to the nodes (KubeRay worker group)
    that advertise them (`rayStartParams: {resources: ...}`). Empty = any node with room."""


class VLLMOptions(_Strict):
    """Options of a vLLM engine (sampler or teacher). Ignored by the transformers engine."""

    tensor_parallel_size: int = Field(1, ge=1)
    """Tensor-parallel degree inside one engine (GPU only; CPU engines use 1)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Fraction of the GPU this engine may use for weights + KV cache (lower it when colocating)."""
    max_model_len: int = Field(4096, gt=0)
    """Longest prompt + response in tokens (expanded image tokens included)."""
    max_num_seqs: int = Field(256, gt=0)
    """Concurrent sequences per engine step."""
    enforce_eager: bool = False
    """Disable CUDA graphs / torch.compile (always on for CPU engines: in-place weight reload needs it)."""
    cpu_kv_cache_gib: int = Field(1, ge=1)
    """KV cache size on CPU engines in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    in_process: bool = True
    """Run the engine core in the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): weights load by reference."""
    max_logprobs: int = Field(64, ge=0)
    """Largest top-k of log-probs an engine may return (teacher top-k for forward_kl_topk)."""
    max_images_per_prompt: int = Field(1, ge=1)
    """Most images one request may carry (vLLM `limit_mm_per_prompt`; its memory profile assumes this many at the
    largest pixel budget). 2 for a teacher that sees the full image and the crop."""
    block_size: int | None = Field(None, ge=16)
    """KV-cache block size in tokens (unset = 32 on CPU, see vzero/engines/vllm.py `_cpu_scheduling`; vLLM's default,
    16, on GPU). The prefix cache shares whole blocks, so smaller blocks share more of each prompt (bench.cpu: 32
    halved generate's CPU time against 128)."""


class DataSynth(_Strict):
    """Generate the synthetic fine-grained task at `data.path` when it does not exist (embedded default)."""

    n: int = Field(64, gt=0)
    """Number of rows."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed; the same seed gives the same file."""
    image_size: int = Field(336, ge=64)
    """Side of the square images in pixels."""


class DataConfig(_Strict):
    """Training prompts: a Parquet file in the vzero schema (see README, Data format)."""

    path: str = "runs/data/synth-train.parquet"
    """Parquet file with id, image, question, evidence_box (+ optional negative_box, source, pos_images, neg_images,
    teacher_prompt)."""
    synth: DataSynth | None = None
    """If set and `path` does not exist, synthesise it first."""
    shuffle: bool = True
    """Shuffle rows, with a new permutation per epoch."""
    max_image_pixels: int = Field(40_000_000, gt=0)
    """Rows whose image has more pixels are quarantined (decompression-bomb guard)."""


class RolloutConfig(_Strict):
    """Student sampling: samplers generate n trajectories per prompt on the full image."""

    engine: EngineKind = "auto"
    """`auto` = vLLM where it is importable, else transformers."""
    num_samplers: int = Field(1, ge=1)
    """Sampler actors; prompts of a step are split across them."""
    prompts_per_step: int = Field(32, ge=1)
    """Prompts drawn per step (each sampled n times)."""
    n: int = Field(8, ge=1)
    """Trajectories per prompt (the gate normalises within these groups)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (the authors use 1.0). At any other value the sampler's log-probs and the learner's
    (PPO ratio, k1) are both those of the tempered distribution actually sampled; the teacher stays at 1."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass. Only 1.0 is accepted: the learner does not re-apply the nucleus cut-off, so with top_p
    < 1 the PPO ratio would compare against a distribution that did not produce the samples."""
    max_tokens: int = Field(2048, ge=1)
    """Longest response in tokens."""
    hf_batch_size: int = Field(16, ge=1)
    """Prompts per transformers generate call (transformers engine only)."""
    resources: ActorResources = ActorResources()
    """Per sampler actor."""
    vllm: VLLMOptions = VLLMOptions()


class TeacherConfig(_Strict):
    """Teacher replay under the positive and negative views (the gating actor)."""

    model: ModelSource | None = None
    """Teacher model; unset = the student's initial model (a self-teacher that sees the zoomed-in crop)."""
    engine: EngineKind = "auto"
    """`auto` = vLLM where importable, else transformers."""
    num_actors: int = Field(1, ge=1)
    """Gating actors; trajectories of one prompt always go to the same actor (shared view encodings)."""
    micro_batch_size: int = Field(16, ge=1)
    """Trajectories per teacher forward (transformers engine; with shared_prefix, whole groups per forward)."""
    scoring: Literal["auto", "per_request", "shared_prefix"] = "auto"
    """How the replays of one step are computed. `per_request` (the authors'): every (trajectory, view) is its own
    request, so the image and question are recomputed 2n times per prompt (vLLM computes prompt_logprobs without
    prefix caching). `shared_prefix`: each (prompt, view) prefix is computed once and its n responses are scored
    against it: a CPU vLLM engine replays one request per prompt, the others read its prefix cache (exact: the same
    kernels; GPU engines and Qwen3.5 on CPU score per request, see vzero/engines/vllm.py); the transformers engine
    runs vzero/shared_prefix.py (the prefix's vision tower and key/value once per group). `auto` = shared_prefix
    where the engine and the model support it, else per_request. Measured on CPU: bench/README.md."""
    context: Context = "full_and_crop"
    """What the teacher prompt shows. `full_and_crop` (the authors'): the FULL image first, then the evidence crop;
    the negative replay swaps only the crop. `crop`: the crop alone (a variant: cheaper, the teacher judges the
    evidence without the scene around it). Applies to `prompt_template` and to rows' own templates (their `<image>`
    markers are dropped under `crop`). `full_and_crop` needs 2 images per prompt: `vllm.max_images_per_prompt` is
    set to 2 unless given (a row with k crops needs k + 1)."""
    prompt_template: str = DEFAULT_TEMPLATE
    """The teacher's user turn for rows without their own (`teacher_prompt` column, e.g. the authors'
    `teacher_raw_prompt`): `<image>` = the full image, `<crop>` = the evidence crop (exactly one), `{question}` = the
    row's question; text in between is kept verbatim. Default: no words of ours, just full image, crop, question."""
    resources: ActorResources = ActorResources()
    vllm: VLLMOptions = VLLMOptions()

    @model_validator(mode="after")
    def _context(self) -> TeacherConfig:
        images, crops = count_markers(self.prompt_template)
        if crops != 1 or images > 1:
            raise ValueError(
                f"prompt_template needs exactly one {CROP} and at most one {IMAGE} (got {crops} and {images}): "
                f"{self.prompt_template!r}"
            )
        if self.context == "full_and_crop":
            if images == 0:
                raise ValueError(
                    f"context=full_and_crop but prompt_template has no {IMAGE}: the teacher would never see the full "
                    "image (add it, or set context=crop)"
                )
            if "max_images_per_prompt" not in self.vllm.model_fields_set:
                self.vllm.max_images_per_prompt = 2
            elif self.vllm.max_images_per_prompt < 2:
                raise ValueError(
                    "context=full_and_crop sends 2 images per teacher prompt (the full image and the crop): "
                    f"vllm.max_images_per_prompt must be >= 2 (got {self.vllm.max_images_per_prompt})"
                )
        return self


class ViewConfig(_Strict):
    """How the teacher's positive (evidence crop) and negative views are built from a row."""

    margin: float = Field(0.1, ge=0, le=2)
    """Padding around the evidence box, as a fraction of the box side."""
    negative_mode: Literal["hard_negative_crop", "downsample_teacher_crop"] = "hard_negative_crop"
    """Negative view: an equal-size irrelevant crop, or the positive crop with its detail destroyed."""
    downsample_factor: float = Field(2.0, gt=1)
    """Factor for `downsample_teacher_crop`."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed for the hard-negative crop location (per row: reproducible)."""


class GateConfig(_Strict):
    """The contrastive evidence gate (vzero-method.md, steps 1-5)."""

    enabled: bool = True
    """Off = plain on-policy distillation (all weights 1): the OPD baseline."""
    level: Literal["sequence", "token"] = "sequence"
    """`sequence` = the authors' gate (one weight per trajectory); `token` = per-token weights (ours)."""
    gamma: float = Field(1.0, ge=0)
    """Penalty on tokens the negative view supports more (s = relu(Δ) − γ·relu(−Δ))."""
    alpha: float = Field(0.5, ge=0)
    """Gate sharpness: w = clamp(1 + α·A, w_min, w_max)."""
    w_min: float = Field(0.0, ge=0)
    """Lower clamp of a weight (0 lets the gate switch a trajectory off entirely)."""
    w_max: float = Field(2.0, gt=0)
    """Upper clamp of a weight."""
    eps: float = Field(1e-6, gt=0)
    """Guards the divisions (token count, group std)."""
    shuffle_control: bool = False
    """Control experiment, not part of the method (authors: no such option, i.e. off): permute the sequence weights
    within each group before they are applied, so they keep their distribution but lose their link to the evidence
    (`gating.gate.shuffle_within_groups`). Needs `enabled` and `level: sequence`."""

    @model_validator(mode="after")
    def _bounds(self) -> GateConfig:
        if self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must be <= w_max ({self.w_max})")
        if self.shuffle_control and (not self.enabled or self.level != "sequence"):
            raise ValueError(
                "gate.shuffle_control permutes sequence weights: it needs gate.enabled=true and gate.level=sequence "
                f"(got enabled={self.enabled}, level={self.level!r})"
            )
        return self


class LossConfig(_Strict):
    """The gated distillation loss toward the positive-view teacher. Defaults are the authors' (their verl fork);
    docs/method.md has the table of our choices vs theirs."""

    mode: Literal["k1_pg", "k3", "forward_kl_topk"] = "k1_pg"
    """k1 with PPO-clip policy gradient (default; the authors'), supervised k3, or forward KL over the teacher's
    top-k."""
    clip_low: float = Field(0.2, ge=0, lt=1)
    """PPO ratio clip below 1 (ratio >= 1 - clip_low). The authors: 0.2."""
    clip_high: float = Field(0.2, ge=0)
    """PPO ratio clip above 1 (ratio <= 1 + clip_high). The authors: 0.2."""
    dual_clip_c: float | None = Field(None, gt=1)
    """Dual-clip PPO for `k1_pg`: a token with a negative advantage loses at most c·|adv| however large its ratio
    (verl's clip_ratio_c; 3 is the usual value). Unset = off, as the authors' launcher runs it."""
    kl_clamp: float = Field(10.0, gt=0)
    """Clamp of the per-token signal: k1 to ±this, the k3 value and the top-k KL to at most this (those tokens then
    send no gradient). The authors: 10."""
    logprob_min: float = Field(-10.0, lt=0)
    """Floor of both sides' log-probs in `forward_kl_topk` (the authors: -10, top-k only); also of lp_s and lp+ in
    k1 / k3 when `floor_sampled_logprobs` is on."""
    floor_sampled_logprobs: bool = False
    """Also floor lp_s and lp+ at `logprob_min` before forming k1 / k3 (ours before #12; the authors: off, k1 taken
    raw). With the floor, a token both models find less likely than e^-10 counts as agreement (k1 = 0) instead of a
    full ±10 reward read from the far tail of two distributions."""
    topk_renormalize: bool = False
    """`forward_kl_topk`: renormalise the teacher's top-k into a distribution, no floor, no clamp (ours before #12;
    the authors: off). A proper KL >= 0 that pushes up every top-k id, even those the student gives < e^-10, which
    the authors' floor leaves without gradient; it ignores the mass the teacher puts outside its top-k."""
    teacher_topk: int = Field(64, ge=1)
    """k for `forward_kl_topk` (teacher prompt_logprobs=k)."""
    old_logprobs: Literal["auto", "sampler", "recompute"] = "auto"
    """Behaviour log-probs lp_old in the PPO ratio. `recompute`: the learner's own, before the step's first update
    (the authors': the ratio is exactly 1 on the first mini-batch and carries no engine drift; costs a no-grad
    forward over the later mini-batches). `sampler`: the rollout engine's, as sampled (the ratio then also corrects
    for staleness and engine drift). `auto` = recompute in sync mode, sampler in async mode. `recompute` with
    mode=async is refused: the samples come from an older policy and recomputing would drop that correction."""


class LearnerConfig(_Strict):
    """The student being trained."""

    lr: float = Field(1e-6, gt=0)
    """AdamW learning rate (the authors use 1e-6 for 4B students)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay (the authors: 0.01)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = Field(1.0, gt=0)
    """Max global grad norm, per optimizer step (the authors: 1.0)."""
    mini_batches_per_step: int = Field(2, ge=1)
    """Optimizer steps per rollout batch (the authors: 2, i.e. 16 of 32 prompts each, ppo_epochs 1). The batch is
    split into this many mini-batches of WHOLE prompt groups, in order (a pure function of the trajectories); each
    is a token-mean over its own tokens and gets its own AdamW step, the later ones off-policy (where the PPO clip
    acts). The policy version still advances once per rollout batch. Needs rollout.prompts_per_step >= this."""
    micro_batch_size: int = Field(8, ge=1)
    """Trajectories per forward/backward; gradients accumulate over a mini-batch's micro-batches."""
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    """Also cap a micro-batch at this many padded positions (what its forward computes: rows x longest sequence, or
    with shared_prefix each prefix once plus the padded responses): long responses get smaller micro-batches instead
    of running out of memory. The loss is the same whatever the split (token-mean over the mini-batch). Unset = no
    cap. (An out-of-memory error still halves the failing micro-batch and retries.)"""
    shared_prefix: bool = True
    """Compute each prompt's image and question once per micro-batch (vzero/shared_prefix.py): the vision tower
    once per image, the prefix once per group, its responses attending to the prefix's keys/values (gradients
    accumulate into both once). Exact (same loss and gradients, tested); measured 4.4x faster steps at 256 image
    tokens and n = 8 on CPU (bench/README.md). Uses the family's preferred route; with gradient_checkpointing the
    packed one (Qwen3.5, which has no packed route, then runs unshared). Off = one full sequence per trajectory (the
    authors')."""
    dtype: DType = "auto"
    """Autocast dtype for the forward: auto = bf16 on GPU, fp32 on CPU."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the trained weights and AdamW state: float32 master weights (default; 16 bytes/param with Adam) or
    pure bfloat16 (8 bytes/param: what lets a 3B learner share one 80 GB GPU with vLLM engines)."""
    peak_tflops: float | None = Field(None, gt=0)
    """Peak dense bf16 TFLOP/s of the learner's GPU for MFU (unset = known GPUs by name; none on CPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory for long responses, ~30% more compute."""
    freeze_vision: bool = False
    """Keep the vision tower fixed: it is not trained and not pushed to samplers."""
    weight_push_every: int = Field(1, ge=1)
    """Push weights to samplers every k steps (and at every checkpoint). Async only: a batch may then lag k - 1
    more versions, so `max_staleness` must be >= k (the in-flight depth shrinks to max_staleness - k + 1)."""
    weight_transport: Literal["auto", "object_store", "cuda_ipc", "collective"] = "auto"
    """How pushed weights reach the samplers. `auto` = CUDA IPC handles for a sampler on the learner's GPU and the
    collective for every other sampler (a mix in one run is fine); `collective` = a process group between learner
    rank 0 and each sampler's workers (NCCL on GPU, gloo on CPU; only metadata travels through Ray);
    `object_store` = one put into Ray's object store, one get per sampler (slowest on GPU: 58 s for 7 GB)."""
    weight_push_timeout_s: float = Field(300.0, gt=0)
    """A push (or a weight-group rendezvous) that has not completed after this many seconds fails with an error
    naming the sampler (a dead or hung peer never blocks the run forever)."""
    world_size: int = Field(1, ge=1)
    """Learner ranks: 1 = one process (no sharding); N > 1 = N ranks (one GPU each, or CPU processes) in one Ray
    placement group training with FSDP2, each on its share of the step; `resources` is per rank."""
    resources: ActorResources = ActorResources()
    """Per learner rank."""

    @model_validator(mode="after")
    def _ranks_get_whole_gpus(self) -> LearnerConfig:
        g = self.resources.num_gpus
        if self.world_size > 1 and 0 < g < 1:
            raise ValueError(
                f"learner.world_size={self.world_size} needs whole GPUs per rank (learner.resources.num_gpus >= 1, "
                f"or 0 for CPU ranks; got {g:g}): NCCL refuses two ranks on one GPU"
            )
        return self


class RayConfig(_Strict):
    """Where the actors run."""

    address: str | None = None
    """Existing cluster (`auto`, `ray://...`, `host:port`); unset = start a local one bound to 127.0.0.1.
    Inside `ray job submit` the job's cluster is used whatever this says."""
    num_cpus: float | None = None
    """Logical CPUs of the local cluster (unset = Ray's count)."""
    num_gpus: float | None = None
    """GPUs of the local cluster (unset = Ray's count)."""
    include_dashboard: bool = False
    """Start the dashboard with the local cluster (on 127.0.0.1)."""
    namespace: str = "vzero"
    """Ray namespace of the job's actors."""


class CheckpointConfig(_Strict):
    """When to write checkpoints (model + optimizer + RNG + data position) under output_dir/checkpoints."""

    every: int = Field(0, ge=0)
    """Checkpoint every N steps (0 = only at the end); always at the end and on SIGTERM."""
    keep_last: int = Field(2, ge=1)
    """How many step checkpoints to keep."""


class LoggingConfig(_Strict):
    """Where metrics go: output_dir/metrics.jsonl always; TensorBoard, console and the Ray dashboard optionally."""

    tensorboard: bool = True
    """Also write TensorBoard events under output_dir/tb."""
    progress_bar: bool = True
    """Print one progress line per step on the console (step, loss, gate weight, seconds)."""
    save_trajectories: bool = True
    """Keep every step's trajectories (ids, log-probs, teacher log-probs, weights) as Parquet."""
    ray_metrics: bool = True
    """Export metrics to the Ray dashboard / Prometheus via ray.util.metrics."""
    verbose: bool = False
    """Let vLLM, Ray, transformers and tqdm print their INFO lines and progress bars (off: warnings and errors only,
    see vzero/console.py)."""


class TrainConfig(_Strict):
    """A whole V-Zero job."""

    steps: int = Field(10, ge=1)
    """Learner steps to run (in total, counting steps before a resume)."""
    output_dir: str = "runs/vzero"
    """Metrics, checkpoints, trajectories and quarantine go here."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Base seed: data order, sampling seeds per step and sampler, hard-negative crops, model init."""
    mode: Literal["sync", "async"] = "sync"
    """`sync` = strictly on-policy (every batch sampled by the weights it is trained on: staleness 0); `async` =
    samplers work on later steps while the learner trains, each batch at most `max_staleness` versions behind."""
    max_staleness: int = Field(1, ge=0)
    """Async only: how many policy versions a batch may lag behind the learner (a bound the driver enforces)."""
    data: DataConfig = DataConfig()
    student: ModelSource = ModelSource()
    teacher: TeacherConfig = TeacherConfig()
    rollout: RolloutConfig = RolloutConfig()
    views: ViewConfig = ViewConfig()
    gate: GateConfig = GateConfig()
    loss: LossConfig = LossConfig()
    learner: LearnerConfig = LearnerConfig()
    ray: RayConfig = RayConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        problems = []
        if self.mode == "async" and self.max_staleness < 1:
            problems.append("mode=async needs max_staleness >= 1 (or use mode=sync)")
        if self.mode == "async" and self.loss.old_logprobs == "recompute":
            problems.append(
                "loss.old_logprobs=recompute with mode=async would treat stale samples as on-policy (the PPO ratio "
                "loses its staleness correction): use loss.old_logprobs=sampler or auto"
            )
        if self.learner.mini_batches_per_step > self.rollout.prompts_per_step:
            problems.append(
                f"learner.mini_batches_per_step ({self.learner.mini_batches_per_step}) must be <= "
                f"rollout.prompts_per_step ({self.rollout.prompts_per_step}): each mini-batch holds whole prompt groups"
            )
        k = self.learner.weight_push_every
        if self.mode == "sync" and k > 1:
            problems.append(
                f"mode=sync is strictly on-policy, but learner.weight_push_every={k} would train on batches sampled "
                f"by weights up to {k - 1} step(s) old: use weight_push_every=1, or mode=async with "
                f"max_staleness >= {k}"
            )
        if self.mode == "async" and k > self.max_staleness:
            problems.append(
                f"mode=async with learner.weight_push_every={k} needs max_staleness >= {k} (got "
                f"{self.max_staleness}): a batch lags up to (steps in flight) + {k - 1} versions, and at least one "
                "step must be in flight; raise max_staleness or lower weight_push_every"
            )
        if self.rollout.top_p < 1:
            problems.append(
                f"rollout.top_p={self.rollout.top_p:g} is refused: the learner does not apply the nucleus cut-off, "
                "so the PPO ratio would compare against a distribution that did not produce the samples (use 1.0)"
            )
        if (
            self.loss.mode == "forward_kl_topk"
            and self.teacher.engine != "transformers"
            and self.loss.teacher_topk > self.teacher.vllm.max_logprobs
        ):
            problems.append(
                f"loss.teacher_topk ({self.loss.teacher_topk}) must be <= teacher.vllm.max_logprobs "
                f"({self.teacher.vllm.max_logprobs}): a vLLM teacher returns at most that many log-probs per token"
            )
        for name, res, v in (
            ("rollout", self.rollout.resources, self.rollout.vllm),
            ("teacher", self.teacher.resources, self.teacher.vllm),
        ):
            tp = v.tensor_parallel_size
            if tp > 1 and res.num_gpus < tp:
                problems.append(
                    f"{name}.vllm.tensor_parallel_size={tp} needs {name}.resources.num_gpus >= {tp} (each engine "
                    f"spans tp GPUs; got {res.num_gpus:g})"
                )
            if self.rollout.max_tokens >= v.max_model_len:
                problems.append(
                    f"rollout.max_tokens ({self.rollout.max_tokens}) must be < {name}.vllm.max_model_len "
                    f"({v.max_model_len}): raise max_model_len or lower max_tokens"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def teacher_model(self) -> ModelSource:
        """The teacher's model source (the student's initial model when none is given)."""
        return self.teacher.model if self.teacher.model is not None else self.student


class ConfigError(ValueError):
    """A config file or override is invalid; the message lists every problem with its field path."""


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for 'did you mean' hints)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = args[0] if args else ann
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}): {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            owner = _model_at(TrainConfig, loc[:-1])
            known = list(owner.model_fields) if owner else []
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = "unknown key" + (f" (did you mean {'.'.join([*map(str, loc[:-1]), hint[0]])!r}?)" if hint else "")
            if known and not hint:
                msg += f"; known keys here: {', '.join(known)}"
        elif "input" in e and e["type"] not in ("missing", "value_error") and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML (optional), apply `key.sub=value` overrides, validate; raise ConfigError listing every problem."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        tree = loaded or {}
        source = str(p)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
        source += " + overrides"
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def dump_config(cfg: TrainConfig) -> str:
    """YAML of the full resolved config (written next to the run's outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
