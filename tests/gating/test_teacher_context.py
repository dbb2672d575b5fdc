"""The gating actor's teacher context, checked against a direct transformers forward (processor + model, none of the
project's input code in between), for the transformers and the vLLM engine (in-process, no Ray).

Invariants:
- `full_and_crop`: the positive replay's log-probs equal a forward on [the full image at the teacher's budget, the
  evidence crop] in that order; the negative replay keeps the same full image and swaps only the crop;
- `crop`: they equal a forward on [the crop] alone, and differ from `full_and_crop`'s (the full image reaches the
  teacher);
- a row with its own template and three crops (what `import-vzero` makes of the authors' rows) is replayed with its
  wording verbatim and [full, crop 1, crop 2, crop 3] / [full, negative 1, negative 2, negative 3];
- a row needing more images than the vLLM engine takes is named, with the field to raise.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from gating.teacher import Gating, teacher_inputs
from tests.conftest import needs_vllm, tiny_config
from tests.vzero.image_helpers import encoded, noise_image
from vzero.config import TrainConfig
from vzero.data.stream import PromptStream
from vzero.images import decode_rgb
from vzero.models.families import family_of
from vzero.records import Prompt, Trajectory
from vzero.views import positive_view, resize_to_budget

RESPONSES = ("red square<|im_end|>", "a blue circle<|im_end|>")
ENGINES = ["transformers", pytest.param("vllm", marks=[needs_vllm, pytest.mark.vllm, pytest.mark.slow])]


@pytest.fixture(scope="module", params=ENGINES)
def gating(request, tiny_model, synth_data, tmp_path_factory) -> Iterator[tuple[Gating, TrainConfig, list[Prompt]]]:
    cfg = tiny_config(
        tmp_path_factory.mktemp("ctx"),
        tiny_model,
        synth_data,
        f"teacher.engine={request.param}",
        "teacher.context=full_and_crop",
        "teacher.vllm.max_images_per_prompt=4",  # room for the three-crop row
    )
    g = Gating(cfg, 0)
    yield g, cfg, PromptStream(cfg.data.path, seed=0).next_batch(2)
    g.engine.close()


@pytest.fixture(scope="module")
def reference(tiny_model):
    """A direct transformers forward: log p(response | user turn of `parts` with `images`)."""
    from vzero.models.loading import load_model, load_processor

    processor, model = load_processor(tiny_model), load_model(str(tiny_model), dtype="float32", device="cpu").eval()

    def logprobs(parts: list[dict], images: list, response: list[int], cfg: TrainConfig) -> torch.Tensor:
        messages = [{"role": "user", "content": parts}]
        text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        budget = {"shortest_edge": cfg.teacher_model.min_pixels, "longest_edge": cfg.teacher_model.max_pixels}
        inputs = processor(text=[text], images=images, return_tensors="pt", size=budget)
        extra = torch.tensor([response])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        mm = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(extra, dtype=mm.dtype)], dim=1)
        with torch.no_grad():
            logits = model(**inputs).logits[0, -len(response) - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, extra[0, :, None])[:, 0]

    return logprobs


def _trajectories(g: Gating, prompts: list[Prompt]) -> list[Trajectory]:
    out = []
    for p in prompts:
        for j, text in enumerate(RESPONSES):
            ids = g.tokenizer.encode(text, add_special_tokens=False)
            out.append(Trajectory(p.uid, j, 0, [], ids, [0.0] * len(ids), "stop"))
    return out


def _with_context(cfg: TrainConfig, context: str) -> TrainConfig:
    c = cfg.model_copy(deep=True)
    c.teacher.context = context
    return c


def _atol(g: Gating, cfg: TrainConfig) -> float:
    return family_of(cfg.teacher_model.path).logprob_atol if g.engine.name == "vllm" else 2e-5


def test_full_and_crop_is_the_full_image_then_the_crop_and_differs_from_crop_only(gating, reference) -> None:
    g, cfg, prompts = gating
    budget = {"min_pixels": cfg.teacher_model.min_pixels, "max_pixels": cfg.teacher_model.max_pixels}
    full_and_crop, _ = g.gate(_trajectories(g, prompts), {p.uid: p for p in prompts})
    g.cfg = _with_context(cfg, "crop")  # same engine (it takes up to 4 images), the other context
    try:
        crop_only, _ = g.gate(_trajectories(g, prompts), {p.uid: p for p in prompts})
    finally:
        g.cfg = cfg
    question_parts = lambda p: [{"type": "text", "text": p.question}]  # noqa: E731
    image = {"type": "image"}
    diffs = []
    for both, alone in zip(full_and_crop, crop_only, strict=True):
        p = next(q for q in prompts if q.uid == both.uid)
        full = decode_rgb(p.image)
        crop = positive_view(full, p.evidence_box, margin=cfg.views.margin, **budget)
        shown_full = resize_to_budget(full, **budget)
        want_both = reference([image, image, *question_parts(p)], [shown_full, crop], both.response_ids, cfg)
        want_alone = reference([image, *question_parts(p)], [crop], alone.response_ids, cfg)
        torch.testing.assert_close(torch.tensor(both.lp_pos), want_both, atol=_atol(g, cfg), rtol=0)
        torch.testing.assert_close(torch.tensor(alone.lp_pos), want_alone, atol=_atol(g, cfg), rtol=0)
        diffs.append(float((want_both - want_alone).abs().max()))
    assert max(diffs) > 1e-3, "the full image reaches the teacher"

    inputs = teacher_inputs(prompts[0], cfg, g.tokenizer)
    assert inputs.pos[0] is inputs.neg[0] and inputs.pos[1] is not inputs.neg[1]  # only the crop is swapped
    assert inputs.neg[1].size == inputs.pos[1].size


def test_a_rows_own_template_and_three_crops_are_replayed_as_written(gating, reference) -> None:
    g, cfg, prompts = gating
    base = prompts[0]
    crops = tuple(encoded(noise_image(24, 18, seed=s)) for s in (1, 2, 3))
    negs = tuple(encoded(noise_image(24, 18, seed=s)) for s in (4, 5, 6))
    template = "Scene: <image>\nZooms: <crop>, <crop> and <crop>.\nWhat is written there?"
    row = Prompt(**{**base.__dict__, "teacher_prompt": template, "pos_images": crops, "neg_images": negs})
    (t, *_), _ = g.gate(_trajectories(g, [row]), {row.uid: row})

    budget = {"min_pixels": cfg.teacher_model.min_pixels, "max_pixels": cfg.teacher_model.max_pixels}
    image = {"type": "image"}
    parts = [
        {"type": "text", "text": "Scene: "},
        image,
        {"type": "text", "text": "\nZooms: "},
        image,
        {"type": "text", "text": ", "},
        image,
        {"type": "text", "text": " and "},
        image,
        {"type": "text", "text": ".\nWhat is written there?"},
    ]
    full = resize_to_budget(decode_rgb(row.image), **budget)
    shown = [resize_to_budget(decode_rgb(c), **budget) for c in crops]
    shown_negs = [resize_to_budget(decode_rgb(c), **budget) for c in negs]
    atol = _atol(g, cfg)
    torch.testing.assert_close(
        torch.tensor(t.lp_pos), reference(parts, [full, *shown], t.response_ids, cfg), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(t.lp_neg), reference(parts, [full, *shown_negs], t.response_ids, cfg), atol=atol, rtol=0
    )
    assert t.negative_mode == "precomputed"


def test_a_row_needing_more_images_than_the_vllm_limit_is_named(gating) -> None:
    g, _, prompts = gating
    crops = tuple(encoded(noise_image(24, 18, seed=s)) for s in range(4))  # full image + 4 crops = 5 > 4
    row = Prompt(**{**prompts[0].__dict__, "teacher_prompt": "<image>" + "<crop>" * 4 + "?", "pos_images": crops})
    trajectories = _trajectories(g, [row])
    if g.engine.name == "vllm":
        with pytest.raises(ValueError, match=rf"prompt {row.uid!r}: .* 5 images .*max_images_per_prompt is 4"):
            g.gate(trajectories, {row.uid: row})
    else:  # the transformers engine has no such limit
        gated, _ = g.gate(trajectories, {row.uid: row})
        assert all(len(t.lp_pos) == t.num_tokens for t in gated)
