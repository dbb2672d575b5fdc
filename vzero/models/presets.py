"""Shape presets for random-init Qwen-VL models: tiny (CPU tests), small (toy runs), 3b (real shapes).

Contract: `get_preset(arch, size)` returns a frozen `Preset` holding every number `vzero.models.tiny` needs
to build a model directory: the text decoder, the vision tower, the image processor's pixel budget, the
tokenizer size and the default dtype. Pure data: no torch, no transformers, cheap to import (the CLI
reads `ARCHS` and `SIZES` from here to build its choices).

Where the numbers come from:
- `3b` copies the released checkpoints' config.json: Qwen/Qwen2.5-VL-3B-Instruct for `qwen2_5_vl`; for
  `qwen2_vl` there is no 3B model, so it is **Qwen/Qwen2-VL-2B-Instruct** (2.2 B parameters). The tokenizer
  is still the small local one, so ids >= 512 of the 151936-row lm_head have no token (as in the real
  checkpoints, whose lm_head is also larger than their tokenizer): samplers must mask them.
- `tiny` is the smallest model vLLM's CPU backend runs: its attention supports head_dim in
  {32, 64, 80, ...} only, so 128 hidden / 4 heads = 32; mrope_section [4, 6, 6] sums to head_dim / 2.
  The tokenizer exactly fills the 512-row vocab, so every logit has a token.
- `small` is a few million parameters for a CPU or single-GPU toy experiment, same tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Arch = Literal["qwen2_vl", "qwen2_5_vl"]
Size = Literal["tiny", "small", "3b"]
ARCHS: tuple[Arch, ...] = ("qwen2_vl", "qwen2_5_vl")
SIZES: tuple[Size, ...] = ("tiny", "small", "3b")


@dataclass(frozen=True)
class TextShape:
    """The language decoder (Qwen2 with multimodal RoPE)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    # 3-D RoPE split of head_dim/2 frequencies into (temporal, height, width); must sum to head_dim // 2.
    mrope_section: tuple[int, int, int]
    tie_word_embeddings: bool
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionShape:
    """The ViT. `width` is Qwen2-VL's `embed_dim` and Qwen2.5-VL's `hidden_size`; its output is merged
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
        if self.text.hidden_size % self.text.num_attention_heads:
            raise ValueError(f"{self.arch}/{self.size}: hidden_size must be a multiple of num_attention_heads")
        if sum(self.text.mrope_section) != self.text.head_dim // 2:
            raise ValueError(
                f"{self.arch}/{self.size}: mrope_section {self.text.mrope_section} must sum to head_dim/2 = "
                f"{self.text.head_dim // 2}"
            )
        if self.tokenizer_vocab_size > self.text.vocab_size:
            raise ValueError(f"{self.arch}/{self.size}: tokenizer ({self.tokenizer_vocab_size}) > model vocab")
        if self.arch == "qwen2_vl" and self.vision.intermediate_size % self.vision.width:
            raise ValueError(f"{self.arch}/{self.size}: Qwen2-VL needs vision intermediate_size = k * width")


_TINY_TEXT = TextShape(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    mrope_section=(4, 6, 6),
    tie_word_embeddings=False,
)
_SMALL_TEXT = TextShape(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    mrope_section=(8, 12, 12),
    tie_word_embeddings=False,
)


def _toy_vision(arch: Arch, depth: int, width: int) -> VisionShape:
    """A ViT with 2 heads and a 4x MLP; Qwen2.5-VL alternates windowed and full-attention blocks."""
    full = tuple(range(1, depth, 2)) if arch == "qwen2_5_vl" else ()
    return VisionShape(depth=depth, width=width, num_heads=2, intermediate_size=4 * width, fullatt_block_indexes=full)


_PRESETS: dict[tuple[str, str], Preset] = {}
for _arch in ARCHS:
    _PRESETS[(_arch, "tiny")] = Preset(
        _arch, "tiny", _TINY_TEXT, _toy_vision(_arch, 2, 64), 56 * 56, 224 * 224, 512, "float32", "hand-made, CPU-sized"
    )
    _PRESETS[(_arch, "small")] = Preset(
        _arch, "small", _SMALL_TEXT, _toy_vision(_arch, 4, 128), 56 * 56, 448 * 448, 512, "float32", "hand-made, toy"
    )

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


def get_preset(arch: str, size: str) -> Preset:
    """The preset for `arch` x `size`; the error lists the valid choices."""
    try:
        return _PRESETS[(arch, size)]
    except KeyError:
        raise ValueError(
            f"unknown model preset {arch!r}/{size!r}: arch is one of {ARCHS}, size one of {SIZES}"
        ) from None
