"""Shared-prefix teacher forcing: each (prompt, image) prefix is computed once, its n responses attend to it.

Every prompt is sampled n times, so the n rows of a group share the prefix (system + image tokens + question). The
unshared forward (`vzero.logprobs.response_logprobs`) runs the vision tower and the prefix once per ROW; here they run
once per GROUP, and the responses attend to the prefix's keys/values. Two routes, same numbers:

- ``cache``: a prefix forward over the G unique prefixes (left-padded, ``use_cache=True``) whose key/value cache is
  then indexed to the R response rows, and a response forward [R, T] (right-padded) with explicit M-RoPE position
  ids continuing after the prefix. Attention computes exactly R·T·(P + T) scores.
- ``packed``: ONE forward per group over [prefix, r_1, ..., r_n] with a custom 4-D mask (each response sees the
  prefix and, causally, itself) and positions restarting after the prefix for every response. One pass, but
  attention is dense over (P + ΣT)² with most of it masked, and the key/value of every layer are never repeated.

Both keep the autograd graph: in the learner the prefix's keys/values (and the image embeddings) are shared by the
n rows, so backward accumulates the n rows' gradients into one prefix and ONE vision-tower pass per image. Exact up to
float summation order: the tests hold them to the unshared forward (teacher ≤ 1e-4, gradients ≤ 1e-5, float32).

Contract: rows are (prompt_ids with one image pad per image, encoded image(s) in pad order, response_ids), like
`vlm_inputs.collate`; rows share a prefix iff they have equal prompt ids and the same images (the same EncodedImage
objects, the cheap case callers get by encoding an image once, or equal pixel values).
Outputs are `ResponseLogprobs` in the callers' row order, the same layout as `response_logprobs`. Needs a
transformers Qwen-VL ``...ForConditionalGeneration`` (``.model``, ``.model.get_rope_index``, output embeddings);
the family table says which routes are exact for a model (`shared_prefix_routes`): both for attention-only
decoders; ``cache`` only for Qwen3.5, whose Gated DeltaNet layers' conv and recurrent states after the prefix are
indexed to the rows like the keys/values. Knows nothing about engines, Ray or losses.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from vzero.logprobs import ResponseLogprobs, token_logprobs
from vzero.models.families import family_of, family_of_config
from vzero.vlm_inputs import EncodedImage, Images, expand_image_pads

Route = Literal["cache", "packed"]
ROUTES: tuple[Route, ...] = ("cache", "packed")  # preference order: the first exact one is a model's default

Row = tuple[list[int], Images, list[int]]


@dataclass
class SharedBatch:
    """G unique prefixes (left-padded, one image each) and R response rows (right-padded) pointing at them."""

    prefix_ids: torch.Tensor  # [G, P] expanded prompt ids, left-padded
    prefix_mask: torch.Tensor  # [G, P] 1 on real prefix tokens
    mm_token_type_ids: torch.Tensor  # [G, P] 1 on image tokens
    pixel_values: torch.Tensor  # [sum patches of the groups' images, D]: each group's images once
    image_grid_thw: torch.Tensor  # [number of images, 3], group by group, each group's images in pad order
    response_ids: torch.Tensor  # [R, T] right-padded with pad_id
    row_group: torch.Tensor  # [R] long: the group (prefix row) of each response row, callers' order
    response_lengths: list[int]  # T_r per row
    max_response: int  # max T_r
    pad_id: int  # fills padding positions (never attended to by a real token)

    def to(self, device: torch.device | str) -> SharedBatch:
        return SharedBatch(
            self.prefix_ids.to(device),
            self.prefix_mask.to(device),
            self.mm_token_type_ids.to(device),
            self.pixel_values.to(device),
            self.image_grid_thw.to(device),
            self.response_ids.to(device),
            self.row_group.to(device),
            self.response_lengths,
            self.max_response,
            self.pad_id,
        )

    @property
    def num_groups(self) -> int:
        return int(self.prefix_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Positions really computed: each prefix once plus every response token (what compute scales with)."""
        return int(self.prefix_mask.sum().item()) + sum(self.response_lengths)


def _images(images: Images) -> list[EncodedImage]:
    return [images] if isinstance(images, EncodedImage) else list(images)


def _same_images(a: list[EncodedImage], b: list[EncodedImage]) -> bool:
    return len(a) == len(b) and all(
        x is y or (torch.equal(x.grid_thw, y.grid_thw) and torch.equal(x.pixel_values, y.pixel_values))
        for x, y in zip(a, b, strict=True)
    )


def group_index(rows: list[Row]) -> list[int]:
    """Group id per row, groups numbered in order of first appearance: rows with equal prompt ids and the same images
    (the same EncodedImage objects, or equal pixels) share a group."""
    firsts: dict[tuple[int, ...], list[tuple[list[EncodedImage], int]]] = {}
    out: list[int] = []
    n_groups = 0
    for prompt_ids, images, _ in rows:
        encs = _images(images)
        candidates = firsts.setdefault(tuple(prompt_ids), [])
        g = next((g for other, g in candidates if _same_images(encs, other)), None)
        if g is None:
            g, n_groups = n_groups, n_groups + 1
            candidates.append((encs, g))
        out.append(g)
    return out


def group_chunks(groups: list[int], max_rows: int) -> list[list[int]]:
    """Row indices in chunks of at most `max_rows` rows made of whole groups, groups in first-appearance order.

    Rows of a group go together so their prefix is computed once per chunk; a group larger than `max_rows` is cut
    into pieces of `max_rows` (each piece computes the prefix again)."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    chunks: list[list[int]] = []
    current: list[int] = []
    for rows in members.values():
        pieces = [rows[k : k + max_rows] for k in range(0, len(rows), max_rows)]
        for piece in pieces:
            if current and len(current) + len(piece) > max_rows:
                chunks.append(current)
                current = []
            current.extend(piece)
    if current:
        chunks.append(current)
    return chunks


def computed_positions(
    prefix_lengths: Sequence[int], response_lengths: Sequence[int], groups: Sequence[int], route: Route | None
) -> int:
    """Positions one forward over these rows computes, padding included (what activation memory scales with).

    Unshared (`route` None): rows x longest prefix + response. ``cache``: groups x longest prefix + rows x longest
    response. ``packed``: groups x longest (prefix + its responses). Row i has prefix length prefix_lengths[i]
    (image tokens included), response_lengths[i] tokens, and group groups[i]."""
    if not prefix_lengths:
        return 0
    if route is None:
        return len(prefix_lengths) * max(p + t for p, t in zip(prefix_lengths, response_lengths, strict=True))
    prefix: dict[int, int] = {}
    packed: dict[int, int] = {}
    for p, t, g in zip(prefix_lengths, response_lengths, groups, strict=True):
        prefix[g] = p
        packed[g] = packed.get(g, p) + t
    if route == "cache":
        return len(prefix) * max(prefix.values()) + len(response_lengths) * max(response_lengths)
    return len(packed) * max(packed.values())


def collate_shared(rows: list[Row], *, pad_id: int, image_pad_id: int) -> SharedBatch:
    """Rows -> one prefix per group (left-padded, so every prefix ends at the last column) + right-padded responses."""
    groups = group_index(rows)
    firsts: dict[int, Row] = {}
    for g, row in zip(groups, rows, strict=True):
        firsts.setdefault(g, row)
    encs = [_images(firsts[g][1]) for g in range(len(firsts))]
    prefixes = [
        expand_image_pads(firsts[g][0], image_pad_id, [e.num_pads for e in encs[g]]) for g in range(len(firsts))
    ]
    P = max(len(p) for p in prefixes)
    prefix_ids = torch.full((len(prefixes), P), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((len(prefixes), P), dtype=torch.long)
    for g, p in enumerate(prefixes):
        prefix_ids[g, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        prefix_mask[g, P - len(p) :] = 1
    lengths = [len(r[2]) for r in rows]
    T = max(lengths, default=0)
    response_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, (_, _, resp) in enumerate(rows):
        if resp:
            response_ids[i, : len(resp)] = torch.tensor(resp, dtype=torch.long)
    return SharedBatch(
        prefix_ids=prefix_ids,
        prefix_mask=prefix_mask,
        mm_token_type_ids=((prefix_ids == image_pad_id) & prefix_mask.bool()).to(torch.int32),
        pixel_values=torch.cat([e.pixel_values for group in encs for e in group], dim=0),
        image_grid_thw=torch.cat([e.grid_thw for group in encs for e in group], dim=0),
        response_ids=response_ids,
        row_group=torch.tensor(groups, dtype=torch.long),
        response_lengths=lengths,
        max_response=T,
        pad_id=pad_id,
    )


def shared_prefix_routes(model: torch.nn.Module | str | Path) -> tuple[Route, ...]:
    """The routes exact for a model (or model directory), preferred first: its family's `shared_prefix_routes`.
    (Training with gradient checkpointing rules out ``cache``: checkpointed layers drop the cache.)"""
    if isinstance(model, (str, Path)):
        return family_of(model).shared_prefix_routes  # type: ignore[return-value]
    return family_of_config({"model_type": model.config.model_type}).shared_prefix_routes  # type: ignore[return-value]


def prefix_positions(model: torch.nn.Module, batch: SharedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of the prefixes [3, G, P] (the model's own rule) and the next text position per group [G].

    Text after the image continues at max(prefix positions) + 1 on all three axes, which is where the unshared
    sequence places its response tokens."""
    pos, _ = model.model.get_rope_index(
        input_ids=batch.prefix_ids,
        mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw,
        attention_mask=batch.prefix_mask,
    )
    return pos, pos.amax(dim=(0, 2)) + 1


def shared_prefix_logprobs(
    model: torch.nn.Module,
    batch: SharedBatch,
    *,
    route: Route = "cache",
    topk: int = 0,
    return_logits: bool = False,
    temperature: float = 1.0,
    banned_ids: list[int] | None = None,
) -> ResponseLogprobs:
    """Teacher-forced log-probs of every row's response, each prefix computed once. Gradients flow iff enabled.
    Options as `response_logprobs` (the sampled distribution at `temperature`, with `banned_ids` masked)."""
    R, T = batch.response_ids.shape
    device = batch.response_ids.device
    if T == 0:
        empty = torch.zeros((R, 0), device=device)
        return ResponseLogprobs(empty, empty.bool())
    if route not in shared_prefix_routes(model):
        raise ValueError(
            f"shared-prefix route {route!r} is not exact for this model; it supports {shared_prefix_routes(model)}"
        )
    if route == "cache" and model.training and getattr(model, "is_gradient_checkpointing", False):
        # checkpointed decoder layers drop `past_key_values`: the responses would not see the prefix at all
        raise ValueError("the cache route cannot run under gradient checkpointing; use route 'packed' or unshared")
    # [R, T, V]: row r's column t predicts its response token t. Root-module forwards (not `model.model`), so
    # wrappers that hook the root (FSDP2's unshard, output processing) see the usual calls.
    logits = (_cache_logits if route == "cache" else _packed_logits)(model, batch).float()
    token_lp, top_vals, top_ids = token_logprobs(
        logits, batch.response_ids, topk=topk, temperature=temperature, banned_ids=banned_ids
    )
    mask = torch.arange(T, device=device)[None, :] < torch.tensor(batch.response_lengths, device=device)[:, None]
    # where, not a product: a padding position may hold a banned id (-inf), and -inf * 0 is NaN
    res = ResponseLogprobs(torch.where(mask, token_lp, 0.0), mask, topk_ids=top_ids, topk_logprobs=top_vals)
    if return_logits:
        res.logits = logits
    return res


def _cache_logits(model: torch.nn.Module, batch: SharedBatch) -> torch.Tensor:
    """Route ``cache``: prefix forward with a cache, cache indexed to rows, response forward -> logits [R, T, V]."""
    pos, nxt = prefix_positions(model, batch)
    out = model(
        input_ids=batch.prefix_ids,
        attention_mask=batch.prefix_mask,
        position_ids=pos,
        mm_token_type_ids=batch.mm_token_type_ids,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        use_cache=True,
        logits_to_keep=1,  # the last prefix position predicts response token 0
    )
    cache = out.past_key_values
    rows = batch.row_group
    cache.reorder_cache(rows)  # [G, ...] -> [R, ...] per layer (keys/values, conv/recurrent states): in the graph
    _assign_recurrent_states(cache)
    R, T = batch.response_ids.shape
    resp_pos = (nxt[rows][:, None] + torch.arange(T, device=rows.device)[None, :]).expand(3, R, T)
    mask = torch.cat([batch.prefix_mask[rows], torch.ones_like(batch.response_ids)], dim=1)
    resp = model(
        input_ids=batch.response_ids,
        attention_mask=mask,
        position_ids=resp_pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=torch.arange(T - 1, device=rows.device),  # response position t predicts token t + 1
    )
    return torch.cat([out.logits[:, -1:][rows], resp.logits], dim=1)


def _assign_recurrent_states(cache: object) -> None:
    """Linear-attention cache layers `copy_` the new recurrent state into the old one, which the response forward
    just read: fine for inference, an in-place error for backward. Assign instead (this cache lives for one call)."""

    def assign(layer: object, recurrent_states: torch.Tensor, state_idx: int = 0, **_: object) -> torch.Tensor:
        layer.recurrent_states[state_idx] = recurrent_states
        return recurrent_states

    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "recurrent_states"):
            layer.update_recurrent_state = functools.partial(assign, layer)


def _packed_logits(model: torch.nn.Module, batch: SharedBatch) -> torch.Tensor:
    """Route ``packed``: one row per group [left-padded prefix | r_1 | ... | r_k | pad], a 4-D mask -> [R, T, V]."""
    pos, nxt = prefix_positions(model, batch)
    device = batch.prefix_ids.device
    G, P = batch.prefix_ids.shape
    R, T = batch.response_ids.shape
    rows = batch.row_group.tolist()
    per_group = [[r for r in range(R) if rows[r] == g] for g in range(G)]
    L = P + max(sum(batch.response_lengths[r] for r in members) for members in per_group)
    ids = torch.full((G, L), batch.pad_id, dtype=torch.long, device=device)
    ids[:, :P] = batch.prefix_ids
    seg = torch.full((G, L), -1, dtype=torch.long, device=device)  # -1 = padding, 0 = prefix, k = response k
    seg[:, :P] = torch.where(batch.prefix_mask.bool(), 0, -1)
    positions = torch.zeros((3, G, L), dtype=pos.dtype, device=device)
    positions[:, :, :P] = pos
    # Logits are kept from position P - 1 on; gather[r, t] = where row r's token t is predicted, counted from there.
    gather = torch.zeros((R, T), dtype=torch.long, device=device)
    for g, members in enumerate(per_group):
        start = P
        for k, r in enumerate(members, start=1):
            n = batch.response_lengths[r]
            ids[g, start : start + n] = batch.response_ids[r, :n]
            seg[g, start : start + n] = k
            positions[:, g, start : start + n] = nxt[g] + torch.arange(n, device=device)
            gather[r, 1:n] = torch.arange(start - P + 1, start - P + n, device=device)  # token 0: the prefix's last
            start += n
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones((L, L), dtype=torch.bool, device=device).tril()
    allowed = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool, device=device)  # padding rows see themselves: no all-masked softmax
    out = model(
        input_ids=ids,
        attention_mask=_as_attention_mask(model, allowed[:, None]),
        position_ids=positions,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        use_cache=False,
        logits_to_keep=torch.arange(P - 1, L - 1, device=device),
    )
    return out.logits[batch.row_group[:, None], gather]  # [G, L - P, V] -> [R, T, V]


def _as_attention_mask(model: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A 4-D mask transformers passes through unchanged: bool for sdpa, additive float for eager."""
    impl = model.config._attn_implementation
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = model.get_output_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    raise ValueError(f"the packed shared-prefix route needs sdpa or eager attention, not {impl!r}; use route 'cache'")
