"""Shared-prefix teacher forcing equals the unshared forward, in values and in gradients, per family and route.

Invariants: each (prompt, images) prefix is computed once (each group's images once in the batch) and the per-token
log-probs / top-k / logits equal `response_logprobs` on the same rows (≤ 1e-4, float32; measured ≤ 1e-6 in every
family); the gradients of a loss through them equal the unshared backward (≤ 1e-5; measured ≤ 8e-6 on |g| ~ 10),
vision tower included; a route that is not exact for a family (packed for Qwen3.5's recurrent layers) is refused;
chunks keep groups whole. Real tiny random-init models of every supported family, no mocks.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from vzero.logprobs import response_logprobs
from vzero.models.families import ARCHS, get_family
from vzero.models.loading import load_model, load_processor
from vzero.shared_prefix import (
    ROUTES,
    collate_shared,
    group_chunks,
    group_index,
    shared_prefix_logprobs,
    shared_prefix_routes,
)
from vzero.vlm_inputs import ImageEncoder, chat_prompt_ids, collate

CASES = [(arch, route) for arch in ARCHS for route in get_family(arch).shared_prefix_routes]


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """arch -> (model, tokenizer, image encoder at 4..16 tokens per image); qwen2_vl reuses the session model."""
    from vzero.models.tiny import build_model

    out = {}
    for arch in ARCHS:
        d = tiny_model if arch == "qwen2_vl" else build_model(tmp_path_factory.mktemp(arch), arch=arch, seed=1)
        proc, family = load_processor(d), get_family(arch)
        pix = {"min_pixels": family.pixels_for_tokens(2), "max_pixels": family.pixels_for_tokens(4)}
        out[arch] = (
            load_model(d, dtype="float32", device="cpu"),
            proc.tokenizer,
            ImageEncoder(proc.image_processor, **pix),
        )
    return out


def _rows(tok, enc, seed: int = 0):
    """3 groups with different image sizes and question lengths, the last with two images, 1-4 responses each,
    lengths 1..9, interleaved."""
    rng = np.random.RandomState(seed)
    groups = []
    for g in range(3):
        imgs = [enc(Image.fromarray((rng.rand(84 + 28 * g, 112, 3) * 255).astype("uint8"))) for _ in range(1 + g // 2)]
        question = "What is in the box?" + " Look closely." * g
        groups.append((chat_prompt_ids(tok, question, images=len(imgs)), imgs))
    rows = []
    for j in range(4):
        for g, (ids, e) in enumerate(groups):
            if j <= g + 1:
                T = 1 if (g, j) == (0, 0) else int(rng.randint(2, 10))
                rows.append((ids, e, rng.randint(0, 400, size=T).tolist()))
    return rows


def _ids(tok):
    return {"pad_id": tok.pad_token_id or 0, "image_pad_id": tok.convert_tokens_to_ids("<|image_pad|>")}


def test_each_prefix_and_image_is_in_the_batch_once(models) -> None:
    _, tok, enc = models["qwen2_vl"]
    rows = _rows(tok, enc)
    batch = collate_shared(rows, **_ids(tok))
    assert batch.num_groups == 3 and group_index(rows) == batch.row_group.tolist()
    images = {id(e): e for r in rows for e in r[1]}  # each group's images, once
    assert batch.image_grid_thw.shape[0] == len(images) == 4
    assert batch.pixel_values.shape[0] == sum(int(e.grid_thw.prod()) for e in images.values())
    unshared = collate(rows, **_ids(tok))
    assert batch.num_tokens < unshared.num_tokens
    assert batch.num_tokens == int(batch.prefix_mask.sum()) + sum(len(r[2]) for r in rows)


@pytest.mark.parametrize(("arch", "route"), CASES)
def test_shared_prefix_logprobs_equal_the_unshared_forward(models, arch, route) -> None:
    model, tok, enc = models[arch]
    model.eval()
    rows = _rows(tok, enc)
    with torch.no_grad():
        ref = response_logprobs(model, collate(rows, **_ids(tok)), topk=3, return_logits=True)
        res = shared_prefix_logprobs(model, collate_shared(rows, **_ids(tok)), route=route, topk=3, return_logits=True)
    assert torch.equal(res.mask, ref.mask)
    torch.testing.assert_close(res.logprobs, ref.logprobs, atol=1e-4, rtol=0)
    m = ref.mask
    torch.testing.assert_close(res.topk_logprobs[m], ref.topk_logprobs[m], atol=1e-4, rtol=0)
    assert (res.topk_ids[m] == ref.topk_ids[m]).float().mean() > 0.99  # ties aside, the same top-k
    torch.testing.assert_close(res.logits[m], ref.logits[m], atol=1e-4, rtol=0)


@pytest.mark.parametrize("route", ROUTES)
def test_tempered_logprobs_with_banned_ids_equal_the_unshared_forward(models, route) -> None:
    """The learner's policy log-probs at a sampling temperature != 1 (banned ids at -inf), padding included."""
    model, tok, enc = models["qwen2_5_vl"]
    model.eval()
    rows = _rows(tok, enc, seed=4)
    opts = {"temperature": 0.7, "banned_ids": [tok.pad_token_id or 0, *range(500, 512)]}
    with torch.no_grad():
        ref = response_logprobs(model, collate(rows, **_ids(tok)), **opts)
        res = shared_prefix_logprobs(model, collate_shared(rows, **_ids(tok)), route=route, **opts)
    assert torch.isfinite(res.logprobs).all()
    torch.testing.assert_close(res.logprobs, ref.logprobs, atol=1e-4, rtol=0)


def test_packed_route_with_eager_attention_equals_the_unshared_forward(models) -> None:
    """The packed route's 4-D mask is additive for eager attention (bool for sdpa): same numbers."""
    model, tok, enc = models["qwen2_vl"]
    model.eval()
    rows = _rows(tok, enc, seed=3)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = response_logprobs(model, collate(rows, **_ids(tok)))
            res = shared_prefix_logprobs(model, collate_shared(rows, **_ids(tok)), route="packed")
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(res.logprobs, ref.logprobs, atol=1e-4, rtol=0)


def _grads(model, lp) -> tuple[float, dict[str, torch.Tensor]]:
    w = torch.linspace(0.5, 1.5, lp.logprobs.numel()).view_as(lp.logprobs)
    loss = -(lp.logprobs * w * lp.mask).sum() / lp.mask.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


@pytest.mark.parametrize(("arch", "route"), CASES)
def test_shared_prefix_gradients_equal_the_unshared_backward(models, arch, route) -> None:
    model, tok, enc = models[arch]
    model.train()
    model.zero_grad(set_to_none=True)
    rows = _rows(tok, enc, seed=1)
    loss0, g0 = _grads(model, response_logprobs(model, collate(rows, **_ids(tok))))
    loss1, g1 = _grads(model, shared_prefix_logprobs(model, collate_shared(rows, **_ids(tok)), route=route))
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert g1.keys() == g0.keys() and any(".visual." in f".{k}" for k in g0), "the vision tower gets gradients"
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_group_chunks_keep_groups_whole_and_split_only_oversized_groups() -> None:
    groups = [0, 1, 0, 2, 1, 0, 3, 3, 3, 3, 3]
    chunks = group_chunks(groups, 4)
    assert sorted(i for c in chunks for i in c) == list(range(len(groups)))
    assert all(len(c) <= 4 for c in chunks)
    assert chunks[:2] == [[0, 2, 5], [1, 4, 3]]  # group 0 (3 rows), then groups 1 + 2 (2 + 1 rows)
    assert [len(c) for c in chunks[2:]] == [4, 1]  # group 3 has 5 rows: cut into 4 + 1


def test_equal_pixels_share_a_group_like_the_same_image_object(models) -> None:
    _, tok, enc = models["qwen2_vl"]
    rows = _rows(tok, enc)
    twin = [(p, [copy.deepcopy(e) for e in imgs], r) for p, imgs, r in rows]
    assert group_index(rows + twin) == group_index(rows) * 2


def test_routes_come_from_the_family_and_packed_is_refused_for_recurrent_layers(models) -> None:
    assert {a: shared_prefix_routes(models[a][0]) for a in ARCHS} == {
        "qwen2_vl": ROUTES,
        "qwen2_5_vl": ROUTES,
        "qwen3_vl": ROUTES,
        "qwen3_5": ("cache",),
    }
    model, tok, enc = models["qwen3_5"]
    with pytest.raises(ValueError, match="route 'packed' is not exact for this model"):
        shared_prefix_logprobs(model, collate_shared(_rows(tok, enc), **_ids(tok)), route="packed")
