"""Response-aligned token log-probs from one transformers forward (teacher replay, learner, evaluation).

For a left-padded batch (see `vlm_inputs.collate`) row i's response occupies the last T_i positions; the logits that
predict them sit one position earlier. We ask the model for only the last max_T + 1 logits (`logits_to_keep`), so the
[B, L, V] tensor is never materialised: with a 150k vocabulary that is the difference between fitting and not.

Outputs are [B, max_T] with a mask; row i's valid tokens are its first T_i columns (response order), the same
layout the gate and the losses take. Log-probs are log_softmax of the raw logits (temperature 1), matching vLLM's
default `raw_logprobs`, so sampler, teacher and learner numbers are comparable. A learner whose samplers draw at
another temperature asks for `temperature` and `banned_ids`: the log-probs of the distribution actually sampled,
log_softmax((logits with the never-sampled ids at -inf) / temperature), as vLLM's `processed_logprobs` reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vzero.vlm_inputs import SequenceBatch


@dataclass
class ResponseLogprobs:
    logprobs: torch.Tensor  # [B, T] log p(y_t | ...) of the given response tokens (0 where masked)
    mask: torch.Tensor  # [B, T] bool, True on real response tokens
    logits: torch.Tensor | None = None  # [B, T, V] raw logits at those positions (only when asked)
    topk_ids: torch.Tensor | None = None  # [B, T, k]
    topk_logprobs: torch.Tensor | None = None  # [B, T, k]


def _align(x: torch.Tensor, lengths: list[int], T: int) -> torch.Tensor:
    """[B, T(+...), ...] right-aligned (response at the end) -> left-aligned in response order."""
    out = torch.zeros_like(x)
    for i, n in enumerate(lengths):
        if n:
            out[i, :n] = x[i, T - n :]
    return out


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    topk: int = 0,
    temperature: float = 1.0,
    banned_ids: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Float logits [B, T, V] and the tokens they predict [B, T] -> (log-probs of those tokens [B, T], top-k log-probs
    and ids [B, T, k] or None). `temperature` != 1 masks `banned_ids` and scales (the sampled distribution); the
    top-k stay raw."""
    logp = torch.log_softmax(logits, dim=-1) if temperature == 1.0 or topk else None
    if temperature == 1.0:
        token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    else:  # gather minus logsumexp: one [B, T, V] copy more, not two
        banned = torch.tensor(banned_ids or [], dtype=torch.long, device=logits.device)
        scaled = logits.index_fill(-1, banned, float("-inf")) / temperature
        token_lp = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
    if not topk:
        return token_lp, None, None
    vals, ids = logp.topk(topk, dim=-1)
    return token_lp, vals, ids


def response_logprobs(
    model: torch.nn.Module,
    batch: SequenceBatch,
    *,
    topk: int = 0,
    return_logits: bool = False,
    temperature: float = 1.0,
    banned_ids: list[int] | None = None,
) -> ResponseLogprobs:
    """Teacher-forced log-probs of each row's response tokens. Gradients flow iff the caller enables them.

    `temperature` != 1 (with the `banned_ids` a sampler never emits) gives the sampled distribution's log-probs;
    top-k and the returned logits stay raw."""
    T = batch.max_response
    B = batch.input_ids.shape[0]
    device = batch.input_ids.device
    if T == 0:
        empty = torch.zeros((B, 0), device=device)
        return ResponseLogprobs(empty, empty.bool())
    out = model(**batch.model_inputs(), logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, -(T + 1) : -1, :].float()  # position j predicts token j+1
    token_lp, top_vals, top_ids = token_logprobs(
        logits, batch.input_ids[:, -T:], topk=topk, temperature=temperature, banned_ids=banned_ids
    )
    lengths = batch.response_lengths
    mask = torch.zeros((B, T), dtype=torch.bool, device=device)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    res = ResponseLogprobs(_align(token_lp, lengths, T) * mask, mask)
    if topk:
        res.topk_ids = _align(top_ids, lengths, T)
        res.topk_logprobs = _align(top_vals, lengths, T)
    if return_logits:
        res.logits = _align(logits, lengths, T)
    return res
