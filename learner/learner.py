"""LearnerActor: owns the student being trained; recomputes its log-probs, applies the gated loss, steps, publishes.

Per step (one rollout batch): the trajectories (with sampler log-probs, positive-view teacher log-probs and gate
weights) are split into `learner.mini_batches_per_step` mini-batches of whole prompt groups (`split_mini_batches`;
the authors: 2). Each mini-batch gets its own AdamW step: it is split into micro-batches, each teacher-forced through
the student on the FULL image (the student's own view), the loss is `gated_opd_loss` with the mini-batch's valid-token
count as denominator (so accumulating micro-batch gradients gives exactly the token-mean of the mini-batch, as verl's
token-mean), gradients are clipped and AdamW steps. Later mini-batches are off-policy: that is where the PPO clip
acts. The policy version increments once per rollout batch (one weight push per step).

The PPO ratio's lp_old (`loss.old_logprobs`) is either the sampler's or the learner's own before the step's first
update (the authors'): the first mini-batch then uses its own forward, detached (ratio exactly 1), the later ones a
no-grad forward run before the first update. Either way `rollout/logprob_mismatch` compares the sampler's log-probs
with the learner's pre-update ones on the same tokens (engine drift; in async mode also the policy's staleness).

A micro-batch that runs out of memory is split in half and retried; a single trajectory that still does not fit
fails with the knobs to turn. A plain class; the driver makes it a Ray actor. Knows nothing about samplers or the
teacher: weights leave through `state_for_push` and the weight-sync sender.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from learner import fsdp
from learner.collective import CollectiveSender
from learner.losses import gated_opd_loss
from learner.micro_batches import collate_trajectories, learner_route, micro_batches, step_micro_batches
from learner.weight_sync import WeightPush, WeightSender
from vzero.batching import length_mask, pad_ragged, split_mini_batches
from vzero.checkpoint import load_training_state, save_training_state
from vzero.config import TrainConfig
from vzero.engines.base import banned_token_ids
from vzero.flops import mfu, peak_tflops, text_params
from vzero.images import decode_rgb
from vzero.logprobs import response_logprobs
from vzero.models.loading import load_model, load_processor, resolve_dtype
from vzero.records import Prompt, Trajectory
from vzero.runtime import actor_device, setup_threads
from vzero.shared_prefix import SharedBatch, shared_prefix_logprobs
from vzero.vlm_inputs import EncodedImage, ImageEncoder
from vzero.weight_group import GroupSpec


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _key(t: Trajectory) -> tuple[str, int]:
    return t.uid, t.sample_index


@dataclass
class _Pass:
    """How the micro-batches of one mini-batch are run (shared by its micro-batches and their out-of-memory halves)."""

    n_valid: int  # token-mean denominator: the mini-batch's valid tokens (a global count once data-parallel)
    old: dict[tuple[str, int], torch.Tensor] | None = None  # recomputed lp_old per trajectory; None = the sampler's
    self_old: bool = False  # lp_old = this very forward, detached (first mini-batch under recompute): ratio 1 exactly
    measure_mismatch: bool = False  # the weights have not stepped yet: compare the sampler's lp_old with this forward


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
        # The policy is the distribution the samplers draw from: at a temperature other than 1, its log-probs (PPO
        # ratio against the samplers' processed log-probs, k1) are those of the tempered logits without the ids a
        # sampler never emits. The teacher's stay at temperature 1.
        self.temperature = cfg.rollout.temperature
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.banned_ids = banned_token_ids(self.tokenizer, vocab) if self.temperature != 1.0 else []
        # Each group's image and question once per micro-batch where exact (learner/micro_batches.py); None = unshared.
        self.shared_route = learner_route(self.model, cfg.learner)

    # -- forward helpers ----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.autocast_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return nullcontext()

    def _encode_images(self, prompts: dict[str, Prompt], uids: list[str]) -> dict[str, EncodedImage]:
        return {u: self.encoder(decode_rgb(prompts[u].image)) for u in dict.fromkeys(uids)}

    def _batch(self, trajs: list[Trajectory], images: dict[str, EncodedImage]):
        ids = {"pad_id": self.pad_id, "image_pad_id": self.image_pad_id}
        return collate_trajectories(trajs, images, self.shared_route, **ids).to(self.device)

    def _policy_logprobs(self, batch, *, return_logits: bool = False):
        """The current policy's log-probs of the batch's responses (the sampling distribution, see __init__)."""
        opts = {"return_logits": return_logits, "temperature": self.temperature, "banned_ids": self.banned_ids}
        if isinstance(batch, SharedBatch):
            return shared_prefix_logprobs(self.model, batch, route=self.shared_route, **opts)
        return response_logprobs(self.model, batch, **opts)

    @torch.no_grad()
    def logprobs(self, trajectories: list[Trajectory], prompts: dict[str, Prompt]) -> list[list[float]]:
        """Current policy log-probs of the given responses (evaluation / tests: do the weights move?), in the
        micro-batches a training step would run (`step_micro_batches`: the same bits as its forwards)."""
        self.model.eval()
        try:
            images = self._encode_images(prompts, [t.uid for t in trajectories])
            out: dict[int, list[float]] = {}
            for micro in step_micro_batches(trajectories, images, self.cfg.learner, self.shared_route):
                res = self._forward(self._batch(micro, images))
                out.update({id(t): res.logprobs[i, : t.num_tokens].float().tolist() for i, t in enumerate(micro)})
            return [out[id(t)] for t in trajectories]
        finally:
            self.model.train()
            if self.dp is not None:
                fsdp.reshard(self.model)

    # -- training -----------------------------------------------------------------------------------------------
    def _forward(self, batch, *, return_logits: bool = False):
        """The student's response log-probs: the one forward the loss, the lp_old recompute and the mismatch share
        (of the sampling distribution: tempered, banned ids masked, see `_policy_logprobs`)."""
        with self._autocast():
            return self._policy_logprobs(batch, return_logits=return_logits)

    def _recompute_old(self) -> bool:
        """`loss.old_logprobs` resolved: `auto` = recompute in sync mode (the authors'), the sampler's in async."""
        wanted = self.cfg.loss.old_logprobs
        return wanted == "recompute" or (wanted == "auto" and self.cfg.mode == "sync")

    def _micro_loss(self, trajs: list[Trajectory], images, plan: _Pass) -> tuple[float, dict[str, float], int]:
        """Forward + backward of one micro-batch; returns (loss contribution, metrics, sequence tokens)."""
        c = self.cfg.loss
        batch = self._batch(trajs, images)
        topk = c.mode == "forward_kl_topk"
        res = self._forward(batch, return_logits=topk)
        mask = length_mask([t.num_tokens for t in trajs]).to(self.device)
        sampler_old = pad_ragged([t.lp_old for t in trajs]).to(self.device)
        if plan.self_old:
            old = res.logprobs.detach()
        elif plan.old is not None:
            old = pad_ragged([plan.old[_key(t)] for t in trajs]).to(self.device)
        else:
            old = sampler_old
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
            dual_clip_c=c.dual_clip_c,
            kl_clamp=c.kl_clamp,
            logprob_min=c.logprob_min,
            floor_sampled_logprobs=c.floor_sampled_logprobs,
            topk_renormalize=c.topk_renormalize,
            teacher_topk=teacher_topk,
            student_logits=res.logits,
            num_valid_tokens=plan.n_valid,
        )
        loss.backward()
        if plan.measure_mismatch:
            metrics.update(_mismatch(sampler_old, res.logprobs.detach(), mask))
        return float(loss.detach()), metrics, batch.num_tokens

    def _run(self, trajs: list[Trajectory], images, plan: _Pass, acc: dict[str, float]) -> None:
        """Run a micro-batch; on out-of-memory split it in half and retry (down to one trajectory)."""
        try:
            loss, metrics, seq_tokens = self._micro_loss(trajs, images, plan)
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
            self._run(trajs[:half], images, plan, acc)
            self._run(trajs[half:], images, plan, acc)
            return
        tokens = sum(t.num_tokens for t in trajs)
        acc["loss"] = acc.get("loss", 0.0) + loss
        acc["seq_tokens"] = acc.get("seq_tokens", 0.0) + seq_tokens
        for k, v in metrics.items():  # token-weighted means over the mini-batch; sums for the mismatch
            if k == "loss":
                continue
            if k.startswith("mismatch_"):
                _add(acc, k, v)
                continue
            key = f"loss/{k}"
            acc[key] = max(acc.get(key, v), v) if k.endswith("_max") else acc.get(key, 0.0) + v * tokens / plan.n_valid

    def _micro_batches(self, trajectories: list[Trajectory], images) -> list[list[Trajectory]]:
        """`micro_batch_size` trajectories at most, and `max_tokens_per_micro_batch` positions as the route computes
        them (learner/micro_batches.py)."""
        return micro_batches(trajectories, images, self.cfg.learner, self.shared_route)

    @torch.no_grad()
    def _recompute_logprobs(self, trajs: list[Trajectory], images, acc: dict[str, float]):
        """lp_old of `trajs` under the current weights (before the step's first update), plus their mismatch.

        Eval mode, as `logprobs` (no dropout in the supported families, so the numbers equal a training forward's),
        in the training micro-batches: a no-grad forward needs less memory than the ones that already fit.
        """
        old: dict[tuple[str, int], torch.Tensor] = {}
        self.model.eval()
        try:
            micros = self._micro_batches(trajs, images)
            for _ in range(self._passes(len(micros)) - len(micros)):  # every FSDP rank runs as many forwards
                self._forward(self._batch(self._idle_rows, images))
            for micro in micros:
                batch = self._batch(micro, images)
                lp = self._forward(batch).logprobs
                mask = length_mask([t.num_tokens for t in micro]).to(self.device)
                for k, v in _mismatch(pad_ragged([t.lp_old for t in micro]).to(self.device), lp, mask).items():
                    _add(acc, k, v)
                acc["recompute_seq_tokens"] = acc.get("recompute_seq_tokens", 0.0) + batch.num_tokens
                old.update({_key(t): lp[i, : t.num_tokens].float().cpu() for i, t in enumerate(micro)})
        finally:
            self.model.train()
            if self.dp is not None:
                fsdp.reshard(self.model)
        return old

    def _mini_batch_backward(self, mini: list[Trajectory], images, plan: _Pass) -> dict[str, float]:
        """Gradients of one mini-batch's token-mean loss in the parameters' .grad (no optimizer step); its metrics.

        Sharded: this rank's share of the mini-batch (`plan.n_valid` is the whole mini-batch's count, so the summed
        gradients are one learner's), as many passes as the busiest rank, metrics summed over ranks."""
        acc: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        micros = self._micro_batches(self._share(mini), images)
        for _ in range(self._passes(len(micros)) - len(micros)):  # zero loss, every FSDP collective
            (self._forward(self._batch(self._idle_rows, images)).logprobs.sum() * 0.0).backward()
        for micro in micros:
            self._run(micro, images, plan, acc)
        return self.dp.merge(acc) if self.dp is not None else acc

    # Sharded ranks (learner/fsdp.py): every rank gets the whole batch and takes its share.
    def _share(self, trajs: list[Trajectory]) -> list[Trajectory]:
        return self.dp.share(trajs) if self.dp is not None else trajs

    def _passes(self, n: int) -> int:
        """Micro-batches every rank runs (the largest count over ranks: agreed BEFORE any FSDP collective)."""
        return self.dp.agree(n) if self.dp is not None else n

    def train_step(self, trajectories: list[Trajectory], prompts: dict[str, Prompt]) -> dict[str, float]:
        """One rollout batch: `mini_batches_per_step` AdamW steps over whole prompt groups, then version + 1.

        Returns metrics: "loss" (token-weighted over the mini-batches, each at the weights it was trained at),
        "loss/last_mini_batch", "loss/*" (token means over the whole step: clip fraction over all tokens; maxima
        over all), grad norm (mean and max over the optimizer steps), tokens/s, MFU, "rollout/logprob_mismatch"
        (+ "_max") and the policy version.
        """
        t0 = time.perf_counter()
        images = self._encode_images(prompts, [t.uid for t in trajectories])
        self._idle_rows = trajectories[:1]  # what a rank short of work runs (zero loss) to match the others
        minis = split_mini_batches(trajectories, self.cfg.learner.mini_batches_per_step)
        n_step = max(1, sum(t.num_tokens for t in trajectories))
        recompute = self._recompute_old()
        # Everything the later mini-batches need from the pre-update weights is read now, before the first step.
        extra: dict[str, float] = {}
        later = [t for m in minis[1:] for t in self._share(m)]  # a rank trains (and recomputes) its share only
        old = self._recompute_logprobs(later, images, extra) if recompute else None
        if self.dp is not None:
            extra = self.dp.merge(extra)
        params = [p for p in self.model.parameters() if p.requires_grad]
        out: dict[str, float] = {}
        grad_norms: list[float] = []
        for j, mini in enumerate(minis):
            n_valid = max(1, sum(t.num_tokens for t in mini))
            plan = _Pass(n_valid, old=old, self_old=recompute and j == 0, measure_mismatch=j == 0)
            acc = self._mini_batch_backward(mini, images, plan)
            grad_norms.append(fsdp.grad_norm(torch.nn.utils.clip_grad_norm_(params, self.cfg.learner.grad_clip)))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for k, v in acc.items():  # mini-batch means -> step means (token-weighted); maxima and sums as they are
                if k.startswith("loss") and not k.endswith("_max"):
                    out[k] = out.get(k, 0.0) + v * n_valid / n_step
                else:
                    _add(out, k, v)
            out["loss/last_mini_batch"] = acc.get("loss", 0.0)
        self.version += 1
        seconds = time.perf_counter() - t0
        for k, v in extra.items():
            _add(out, k, v)
        # The recompute is a forward only: 2 of the 6 FLOPs per parameter and token of a training forward + backward.
        flop_tokens = out.pop("seq_tokens", 0.0) + out.pop("recompute_seq_tokens", 0.0) / 3
        n_mm = out.pop("mismatch_count", 0.0)
        out.update(
            {
                "rollout/logprob_mismatch": out.pop("mismatch_sum", 0.0) / n_mm if n_mm else 0.0,
                "rollout/logprob_mismatch_max": out.pop("mismatch_max", 0.0),
                "rollout/logprob_mismatch_tokens": n_mm,
                "learner/old_logprobs_recomputed": float(recompute),
                "learner/mini_batches": float(len(minis)),
                "learner/grad_norm": sum(grad_norms) / len(grad_norms),
                "learner/grad_norm_max": max(grad_norms),
                "learner/seconds": seconds,
                "learner/tokens_per_s": n_step / seconds,
                "learner/seq_tokens_per_s": flop_tokens / seconds,
                "learner/mfu": mfu(self.n_text_params, flop_tokens, seconds, self.peak_tflops) or 0.0,
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
            self._collective = CollectiveSender(self.device, timeout_s=self.cfg.learner.weight_push_timeout_s)
        return self._collective

    def open_weight_group(self, key: str, world_size: int) -> GroupSpec:
        return self._collective_sender().open_group(key, world_size)

    def join_weight_group(self, key: str) -> str:
        return self._collective_sender().join_group(key)

    def send_weights(self, version: int, keys: list[str]) -> dict[str, str]:
        return self._collective_sender().send(version, keys)

    def release_push(self, keep: list[int] | None = None) -> None:
        """Drop the CUDA IPC / collective buckets of every version not in `keep` (never sent again)."""
        for sender in [*self._senders.values(), *([self._collective] if self._collective else [])]:
            sender.release(keep or ())

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


def _mismatch(sampler: torch.Tensor, learner: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sum, count and max of |sampler lp − learner lp| over the valid tokens (same tokens, same weights)."""
    diff = (sampler.float() - learner.float()).abs()[mask]
    if diff.numel() == 0:
        return {"mismatch_sum": 0.0, "mismatch_count": 0.0}
    return {
        "mismatch_sum": float(diff.double().sum()),
        "mismatch_count": float(diff.numel()),
        "mismatch_max": float(diff.max()),
    }


def _add(acc: dict[str, float], key: str, value: float) -> None:
    """Accumulate a sum (or, for keys ending in _max, a maximum)."""
    acc[key] = max(acc.get(key, value), value) if key.endswith("_max") else acc.get(key, 0.0) + value
