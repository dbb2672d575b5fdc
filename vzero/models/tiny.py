"""Build a random-init Qwen-VL model directory (any family of `vzero.models.families`) that transformers and
vLLM both load.

Contract: `build_model(out_dir, arch=..., preset=..., seed=...)` writes, with `save_pretrained` and no
network access, a complete model directory:
  config.json + model.safetensors (random weights, identical bytes for the same seed/preset/dtype on
  the same device and library versions), generation_config.json (eos = [<|im_end|>, <|endoftext|>],
  pad = <|endoftext|>), the locally trained tokenizer with the family's chat template, and the
  processor (image + video processor; the video one needs torchvision).
The shapes come from `vzero.models.presets`; the vision token ids in config.json are read from the
tokenizer, so the two cannot disagree. The config carries the flags the released checkpoints carry
(`mrope_interleaved: true` for Qwen3-VL / Qwen3.5, Qwen3.5's `layer_types`, partial rotary factor and
Gated DeltaNet sizes, Qwen3-VL's deepstack indexes); Qwen3.5's multi-token-prediction head (`mtp.*` in real
checkpoints) is not built: neither transformers nor vLLM's served model loads it. The caller's torch RNG
state is left as it was.

`device="cuda"` initialises the weights directly on the GPU (the 3b preset is 3.75 B parameters; a
similar build took 14 s on an H100, shared/notes/gpu-device.md). CPU works for every preset given the
memory: qwen2_5_vl/3b in bf16 took 72 s and 8.7 GB peak RSS on two cores, writing a 7.5 GB
model.safetensors. Knows nothing about training or sampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedConfig, PreTrainedTokenizerBase, ProcessorMixin

from vzero.models.families import get_family
from vzero.models.presets import Preset, get_preset
from vzero.models.tokenizer import ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, build_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _text_config(preset: Preset, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    text, family = preset.text, get_family(preset.arch)
    ids = tokenizer.convert_tokens_to_ids
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": text.rope_theta}
    rope["mrope_section"] = list(text.mrope_section)
    if family.mrope_interleaved:
        rope["mrope_interleaved"] = True
    config: dict[str, Any] = {
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_parameters": rope,
        # Qwen convention: bos = <|endoftext|> (never prepended), eos = <|im_end|>.
        "bos_token_id": ids(ENDOFTEXT),
        "eos_token_id": ids(IM_END),
        "pad_token_id": ids(ENDOFTEXT),
    }
    if text.explicit_head_dim is None:  # Qwen2 decoders: head_dim = hidden / heads; sliding window off
        config.update({"max_window_layers": text.num_hidden_layers, "use_sliding_window": False})
    else:
        config["head_dim"] = text.explicit_head_dim
    if text.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = text.partial_rotary_factor
    if text.linear is not None:
        lin = text.linear
        config.update(
            {
                "layer_types": lin.layer_types(text.num_hidden_layers),
                "linear_num_key_heads": lin.num_key_heads,
                "linear_num_value_heads": lin.num_value_heads,
                "linear_key_head_dim": lin.key_head_dim,
                "linear_value_head_dim": lin.value_head_dim,
                "linear_conv_kernel_dim": lin.conv_kernel_dim,
            }
        )
    return config


def _vision_config(preset: Preset) -> dict[str, Any]:
    """The vision tower's config: Qwen2-VL's own key names, Qwen2.5-VL's window layout, the Qwen3 towers'."""
    text, vision = preset.text, preset.vision
    common = {
        "depth": vision.depth,
        "num_heads": vision.num_heads,
        "patch_size": vision.patch_size,
        "spatial_merge_size": vision.spatial_merge_size,
        "temporal_patch_size": vision.temporal_patch_size,
    }
    layouts = {
        "qwen2_vl": lambda: {
            "embed_dim": vision.width,
            "mlp_ratio": vision.intermediate_size // vision.width,
            "hidden_size": text.hidden_size,  # Qwen2-VL's merger output size
        },
        "qwen2_5_vl": lambda: {
            "hidden_size": vision.width,
            "intermediate_size": vision.intermediate_size,
            "out_hidden_size": text.hidden_size,
            "window_size": vision.window_size,
            "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "tokens_per_second": vision.tokens_per_second,
        },
        "qwen3_vl": lambda: {
            "hidden_size": vision.width,
            "intermediate_size": vision.intermediate_size,
            "out_hidden_size": text.hidden_size,
            "num_position_embeddings": vision.num_position_embeddings,
            "deepstack_visual_indexes": list(vision.deepstack_indexes),
        },
        "qwen3_5": lambda: {
            "hidden_size": vision.width,
            "intermediate_size": vision.intermediate_size,
            "out_hidden_size": text.hidden_size,
            "num_position_embeddings": vision.num_position_embeddings,
        },
    }
    return {**common, **layouts[preset.arch]()}


def build_config(preset: Preset, tokenizer: PreTrainedTokenizerBase) -> PreTrainedConfig:
    """The transformers config for `preset`, with token ids taken from `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    return get_family(preset.arch).transformers_class("config")(
        text_config=_text_config(preset, tokenizer),
        vision_config=_vision_config(preset),
        tie_word_embeddings=preset.text.tie_word_embeddings,
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
    )


def build_processor(preset: Preset, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin:
    """The family's processor with the preset's pixel budget for both images and videos."""
    from transformers import Qwen2VLImageProcessor

    family, vision = get_family(preset.arch), preset.vision
    patching = {
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
    }
    norm = {"image_mean": list(family.image_mean), "image_std": list(family.image_std)}
    size = {"shortest_edge": preset.min_pixels, "longest_edge": preset.max_pixels}
    return family.transformers_class("processor")(
        image_processor=Qwen2VLImageProcessor(size=size, **patching, **norm),
        video_processor=family.transformers_class("video_processor")(size=size, **patching, **norm),
        tokenizer=tokenizer,
        chat_template=family.chat_template,
    )


def build_model(
    out_dir: str | Path,
    *,
    arch: str = "qwen2_vl",
    preset: str = "tiny",
    seed: int = 0,
    dtype: str | None = None,
    device: str = "cpu",
) -> Path:
    """Build and save a random-init model directory; returns its path.

    `dtype` None means the preset's default (float32 for tiny/small, bfloat16 for 3b / 4b). The weights are
    a function of (preset, seed, dtype, device): CPU and CUDA draw different random streams.
    """
    spec = get_preset(arch, preset)
    dtype = dtype or spec.default_dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(spec.tokenizer_vocab_size, arch=arch)
    config = build_config(spec, tokenizer)
    torch_device = torch.device(device)
    # fork_rng restores the caller's RNG (CPU and, when building there, the one CUDA device) afterwards.
    cuda_devices = [torch_device.index or 0] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), torch_device:
        torch.manual_seed(seed)
        model = get_family(arch).transformers_class("model")._from_config(config, dtype=_DTYPES[dtype])
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)],
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
    )
    model.save_pretrained(out)
    build_processor(spec, tokenizer).save_pretrained(out)
    del model
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()  # the caller is likely to load the model (or vLLM) on this GPU next
    return out
