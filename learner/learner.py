"""LearnerActor: owns the student being trained; recomputes its log-probs, applies the gated loss, steps, publishes.

Per step: the trajectories (with sampler log-probs, positive-view teacher log-probs and gate weights) are split into
micro-batches; each is teacher-forced through the student on the FULL image (the student's own view), the loss is
`gated_opd_loss` with the step's total valid-token count as denominator (so accumulating micro-batch gradients gives
exactly the token-mean of the whole step), gradients are clipped, AdamW steps and the policy version increments.
A micro-batch that runs out of memory is split in half and retried; a single trajectory that still does not fit
fails with the knobs to turn.

A plain class; the driver makes it a Ray actor. Knows nothing about samplers or the teacher: weights leave through
`state_for_push` and the weight-sync sender.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from learner import fsdp
from learner.collective import CollectiveSender
from learner.losses import gated_opd_loss
from learner.weight_sync import WeightPush, WeightSender
from vzero.batching import length_mask, pad_ragged
from vzero.checkpoint import load_training_state, save_training_state
from vzero.config import TrainConfig
from vzero.flops import mfu, peak_tflops, text_params
from vzero.images import decode_rgb
from vzero.logprobs import response_logprobs
from vzero.models.loading import load_model, load_processor, resolve_dtype
from vzero.records import Prompt, Trajectory
from vzero.runtime import actor_device, setup_threads
from vzero.vlm_inputs import EncodedImage, ImageEncoder, collate
from vzero.weight_group import GroupSpec


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Learner:
    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1, master: tuple[str, int] | None = None):
        """`rank`/`world_size`/`master`: this rank of a sharded learner group (learner/group.py spawns them);
        world_size 1 is the single-process learner."""
        self.cfg = cfg
        setup_threads(cfg.learner.resources)
        self.device = torch.device(actor_device(cfg.learner.resources))
        s = cfg.student
        # Master weights in fp32 by default (param_dtype); the forward runs under bf16 autocast on GPU (fp32 on CPU).
        self.model = load_model(
            s.path, dtype=cfg.learner.param_dtype, device=str(self.device), trust_remote_code=s.trust_remote_code
        )
        self.autocast_dtype = resolve_dtype(cfg.learner.dtype, str(self.device))
        if cfg.learner.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.frozen = set()
        if cfg.learner.freeze_vision:
            for name, p in self.model.named_parameters():
                if ".visual." in f".{name}":
                    p.requires_grad_(False)
                    self.frozen.add(name)
        self.model.train()
        # Sharded ranks (learner/fsdp.py): shard before the optimizer sees the parameters.
        self.dp = fsdp.DataParallel(rank, world_size) if world_size > 1 else None
        if self.dp is not None:
            fsdp.init_process_group(rank, world_size, master, self.device, cfg.learner.weight_push_timeout_s)
            fsdp.shard(self.model)
        processor = load_processor(s.path, trust_remote_code=s.trust_remote_code)
        self.tokenizer = processor.tokenizer
        self.encoder = ImageEncoder(processor.image_processor, min_pixels=s.min_pixels, max_pixels=s.max_pixels)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        L = cfg.learner
        self.n_text_params = text_params(self.model)
        self.peak_tflops = peak_tflops(self.device, cfg.learner.peak_tflops)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=L.lr, betas=L.betas, weight_decay=L.weight_decay
        )
        self.version = 0
        self._senders: dict[str, WeightSender] = {}
        self._collective: CollectiveSender | None = None
        sampler_device = "cuda" if cfg.rollout.resources.num_gpus > 0 else "cpu"
        self.push_dtype = resolve_dtype(cfg.student.dtype, sampler_device)

    # -- forward helpers ----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.autocast_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return nullcontext()

    def _encode_images(self, prompts: dict[str, Prompt], uids: list[str]) -> dict[str, EncodedImage]:
        return {u: self.encoder(decode_rgb(prompts[u].image)) for u in dict.fromkeys(uids)}

    def _batch(self, trajs: list[Trajectory], images: dict[str, EncodedImage]):
        rows = [(t.prompt_ids, images[t.uid], t.response_ids) for t in trajs]
        return collate(rows, pad_id=self.pad_id, image_pad_id=self.image_pad_id).to(self.device)

    @torch.no_grad()
    def logprobs(self, trajectories: list[Trajectory], prompts: dict[str, Prompt]) -> list[list[float]]:
        """Current student log-probs of the given responses (evaluation / tests: do the weights move?)."""
        self.model.eval()
        try:
            images = self._encode_images(prompts, [t.uid for t in trajectories])
            with self._autocast():
                res = response_logprobs(self.model, self._batch(trajectories, images))
            return [res.logprobs[i, : t.num_tokens].float().tolist() for i, t in enumerate(trajectories)]
        finally:
            self.model.train()

    # -- training -----------------------------------------------------------------------------------------------
    def _micro_loss(self, trajs: list[Trajectory], images, n_valid: int) -> tuple[float, dict[str, float], int]:
        """Forward + backward of one micro-batch; returns (loss contribution, metrics, sequence tokens)."""
        c = self.cfg.loss
        batch = self._batch(trajs, images)
        topk = c.mode == "forward_kl_topk"
        with self._autocast():
            res = response_logprobs(self.model, batch, return_logits=topk)
        mask = length_mask([t.num_tokens for t in trajs]).to(self.device)
        old = pad_ragged([t.lp_old for t in trajs]).to(self.device)
        teacher = pad_ragged([t.lp_pos for t in trajs]).to(self.device)
        if self.cfg.gate.level == "token":
            weights = pad_ragged([t.token_weights for t in trajs]).to(self.device)
        else:
            weights = torch.tensor([t.weight for t in trajs], dtype=torch.float32, device=self.device)
        teacher_topk = None
        if topk:
            teacher_topk = (
                pad_ragged([[i for row in t.teacher_topk_ids for i in row] for t in trajs], dtype=torch.long)
                .view(len(trajs), -1, c.teacher_topk)
                .to(self.device),
                pad_ragged([[v for row in t.teacher_topk_logprobs for v in row] for t in trajs])
                .view(len(trajs), -1, c.teacher_topk)
                .to(self.device),
            )
        loss, metrics = gated_opd_loss(
            res.logprobs,
            old,
            teacher,
            mask,
            weights,
            mode=c.mode,
            clip_low=c.clip_low,
            clip_high=c.clip_high,
            kl_clamp=c.kl_clamp,
            logprob_min=c.logprob_min,
            teacher_topk=teacher_topk,
            student_logits=res.logits,
            num_valid_tokens=n_valid,
        )
        loss.backward()
        return float(loss.detach()), metrics, batch.num_tokens

    def _run(self, trajs: list[Trajectory], images, n_valid: int, acc: dict[str, float]) -> None:
        """Run a micro-batch; on out-of-memory split it in half and retry (down to one trajectory)."""
        try:
            loss, metrics, seq_tokens = self._micro_loss(trajs, images, n_valid)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            # Gradients of micro-batches that finished are kept; an OOM inside backward could leave a partial
            # gradient behind, which is why the split happens before the failing part's backward completes.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.dp is not None:  # halving here would leave the other ranks' FSDP collectives hanging
                raise RuntimeError(
                    f"learner rank {self.dp.rank} out of memory under FSDP (learner.world_size="
                    f"{self.dp.world_size}): the out-of-memory halving is off with several ranks; lower "
                    "learner.micro_batch_size, set learner.max_tokens_per_micro_batch, set "
                    "learner.gradient_checkpointing=true, or raise learner.world_size"
                ) from exc
            if len(trajs) == 1:
                raise RuntimeError(
                    f"learner out of memory on a single trajectory of {trajs[0].num_tokens} response tokens; lower "
                    "rollout.max_tokens or student.max_pixels, set learner.max_tokens_per_micro_batch, or set "
                    "learner.gradient_checkpointing=true"
                ) from exc
            acc["oom_splits"] = acc.get("oom_splits", 0.0) + 1
            half = len(trajs) // 2
            self._run(trajs[:half], images, n_valid, acc)
            self._run(trajs[half:], images, n_valid, acc)
            return
        tokens = sum(t.num_tokens for t in trajs)
        acc["loss"] = acc.get("loss", 0.0) + loss
        acc["seq_tokens"] = acc.get("seq_tokens", 0.0) + seq_tokens
        for k, v in metrics.items():  # token-weighted means across micro-batches
            if k == "loss":
                continue
            key = f"loss/{k}"
            acc[key] = max(acc.get(key, v), v) if k.endswith("_max") else acc.get(key, 0.0) + v * tokens / n_valid

    def _micro_batches(self, trajectories: list[Trajectory], images) -> list[list[Trajectory]]:
        """Consecutive groups of at most `micro_batch_size` trajectories and `max_tokens_per_micro_batch` tokens.

        The token budget counts the padded batch (rows x longest prompt+response, image tokens included), which is
        what activation memory scales with; a single over-budget trajectory still gets a micro-batch of its own.
        """
        L = self.cfg.learner
        out: list[list[Trajectory]] = []
        current: list[Trajectory] = []
        longest = 0
        for t in trajectories:
            length = len(t.prompt_ids) - 1 + images[t.uid].num_pads + t.num_tokens
            wide = max(longest, length)
            over = L.max_tokens_per_micro_batch is not None and wide * (len(current) + 1) > L.max_tokens_per_micro_batch
            if current and (len(current) == L.micro_batch_size or over):
                out.append(current)
                current, wide = [], length
            current.append(t)
            longest = wide
        if current:
            out.append(current)
        return out

    def train_step(self, trajectories: list[Trajectory], prompts: dict[str, Prompt]) -> dict[str, float]:
        """One optimiser step over all the step's trajectories; returns metrics (loss, grad norm, tokens/s)."""
        t0 = time.perf_counter()
        mine = self.dp.share(trajectories) if self.dp is not None else trajectories  # sharded: this rank's share
        images = self._encode_images(prompts, [t.uid for t in [*mine, trajectories[0]]])
        n_valid = max(1, sum(t.num_tokens for t in trajectories))  # GLOBAL: N ranks step like one
        acc: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        micro = self._micro_batches(mine, images)
        passes = self.dp.agree(len(micro)) if self.dp is not None else len(micro)  # agreed BEFORE any collective
        for m in micro:
            self._run(m, images, n_valid, acc)
        for _ in range(passes - len(micro)):  # a rank with less work still runs every FSDP collective
            fsdp.idle_backward(self.model, self._batch(trajectories[:1], images), self._autocast())
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = fsdp.grad_norm(torch.nn.utils.clip_grad_norm_(params, self.cfg.learner.grad_clip))
        if self.dp is not None:
            acc = self.dp.merge(acc)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        seconds = time.perf_counter() - t0
        out = {k: v for k, v in acc.items() if k != "seq_tokens"}
        out.update(
            {
                "learner/grad_norm": float(grad_norm),
                "learner/seconds": seconds,
                "learner/tokens_per_s": n_valid / seconds,
                "learner/seq_tokens_per_s": acc.get("seq_tokens", 0.0) / seconds,
                "learner/mfu": mfu(self.n_text_params, acc.get("seq_tokens", 0.0), seconds, self.peak_tflops) or 0.0,
                "policy_version": float(self.version),
            }
        )
        return out

    # -- weights out ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def state_for_push(self, transport: str = "object_store") -> WeightPush:
        """The samplers' next weights (HF names; frozen tensors skipped: they never change), bucketed for the
        transport, cast to the samplers' dtype (bf16 on GPU halves the bytes of the fp32 master copy)."""
        if self.dp is not None:  # gathered once from the shards (every rank takes part); rank 0 sends
            named = fsdp.full_weights(self.model, self.push_dtype, self.frozen, self.dp.rank)
            if self.dp.rank != 0:
                return None
        else:
            named = [
                (n, p.detach().to(self.push_dtype)) for n, p in self.model.state_dict().items() if n not in self.frozen
            ]
        if transport == "collective":
            return self._collective_sender().make_push(named, self.version)
        sender = self._senders.get(transport)
        if sender is None:
            sender = self._senders[transport] = WeightSender(transport)
        return sender.make_push(named, self.version)

    # The collective transport (learner/collective.py; the driver runs the protocol, vzero/pushes.py).
    def _collective_sender(self) -> CollectiveSender:
        if self._collective is None:
            keep = self.cfg.max_staleness + 1 if self.cfg.mode == "async" else 1
            self._collective = CollectiveSender(
                self.device, timeout_s=self.cfg.learner.weight_push_timeout_s, keep_versions=keep
            )
        return self._collective

    def open_weight_group(self, key: str, world_size: int) -> GroupSpec:
        return self._collective_sender().open_group(key, world_size)

    def join_weight_group(self, key: str) -> str:
        return self._collective_sender().join_group(key)

    def send_weights(self, version: int, keys: list[str]) -> dict[str, str]:
        return self._collective_sender().send(version, keys)

    def release_push(self) -> None:
        """Every sampler acknowledged the last push: drop the GPU buckets kept alive for CUDA IPC."""
        for sender in self._senders.values():
            sender.release()

    def device_uuid(self) -> str:
        """The learner's GPU (empty on CPU): the driver picks CUDA IPC when every sampler shares it."""
        return str(torch.cuda.get_device_properties(self.device).uuid) if self.device.type == "cuda" else ""

    def policy_version(self) -> int:
        return self.version

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write model (HF format, safetensors) + optimizer + RNG into `directory` (the driver makes it atomic);
        sharded ranks write DCP shards next to the HF model dir (learner/fsdp.py)."""
        if self.dp is not None:
            fsdp.save(
                Path(directory),
                self.model,
                self.optimizer,
                rank=self.dp.rank,
                world_size=self.dp.world_size,
                source_model=self.cfg.student.path,
                version=self.version,
            )
            return
        save_training_state(Path(directory), self.model, self.optimizer, self.cfg.student.path, self.version)

    def load(self, directory: str) -> int:
        """Restore model, optimizer, RNG and version from a checkpoint directory; returns the version. Either
        layout loads into either kind of learner (DCP reshards to this world size)."""
        path, rank = Path(directory), self.dp.rank if self.dp is not None else 0
        if fsdp.is_sharded_checkpoint(path):
            self.version = fsdp.load(path, self.model, self.optimizer, rank=rank)
        elif self.dp is not None:
            self.version = fsdp.load_unsharded(path, self.model, self.optimizer, rank=rank)
        else:
            self.version = load_training_state(path, self.model, self.optimizer)
        return self.version

    def ready(self) -> str:
        """Returns once __init__ finished (the driver waits on it)."""
        if self.dp is not None:
            return f"learner rank {self.dp.rank}/{self.dp.world_size}: transformers + FSDP2 on {self.device}"
        return f"learner: transformers on {self.device}"
