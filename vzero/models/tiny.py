"""Build a random-init Qwen2-VL / Qwen2.5-VL model directory that transformers and vLLM both load.

Contract: `build_model(out_dir, arch=..., preset=..., seed=...)` writes, with `save_pretrained` and no
network access, a complete model directory:
  config.json + model.safetensors (random weights, identical bytes for the same seed/preset/dtype on
  the same device and library versions), generation_config.json (eos = [<|im_end|>, <|endoftext|>],
  pad = <|endoftext|>), the locally trained tokenizer with the Qwen2-VL chat template, and the
  processor (image + video processor; the video one needs torchvision).
The shapes come from `vzero.models.presets`; the vision token ids in config.json are read from the
tokenizer, so the two cannot disagree. The caller's torch RNG state is left as it was.

`device="cuda"` initialises the weights directly on the GPU (the 3b preset is 3.75 B parameters; a
similar build took 14 s on an H100, shared/notes/gpu-device.md). CPU works for every preset given the
memory: qwen2_5_vl/3b in bf16 took 72 s and 8.7 GB peak RSS on two cores, writing a 7.5 GB
model.safetensors. Knows nothing about training or sampling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedConfig,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from vzero.models.presets import Preset, get_preset
from vzero.models.tokenizer import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    build_tokenizer,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
_PROCESSOR_CLASSES = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}


def build_config(preset: Preset, tokenizer: Qwen2Tokenizer) -> PreTrainedConfig:
    """The transformers config for `preset`, with token ids taken from `tokenizer`."""
    text, vision = preset.text, preset.vision
    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,
        "rms_norm_eps": text.rms_norm_eps,
        "use_sliding_window": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": text.rope_theta,
            "mrope_section": list(text.mrope_section),
        },
        # Qwen convention: bos = <|endoftext|> (never prepended), eos = <|im_end|>.
        "bos_token_id": ids(ENDOFTEXT),
        "eos_token_id": ids(IM_END),
        "pad_token_id": ids(ENDOFTEXT),
    }
    common_vision = {
        "depth": vision.depth,
        "num_heads": vision.num_heads,
        "patch_size": vision.patch_size,
        "spatial_merge_size": vision.spatial_merge_size,
        "temporal_patch_size": vision.temporal_patch_size,
    }
    token_ids = {
        "image_token_id": ids(IMAGE_PAD),
        "video_token_id": ids(VIDEO_PAD),
        "vision_start_token_id": ids(VISION_START),
        "vision_end_token_id": ids(VISION_END),
    }
    if preset.arch == "qwen2_vl":
        vision_config = {
            **common_vision,
            "embed_dim": vision.width,
            "mlp_ratio": vision.intermediate_size // vision.width,
            "hidden_size": text.hidden_size,  # Qwen2-VL's merger output size
        }
        config_class = Qwen2VLConfig
    else:
        vision_config = {
            **common_vision,
            "hidden_size": vision.width,
            "intermediate_size": vision.intermediate_size,
            "out_hidden_size": text.hidden_size,
            "window_size": vision.window_size,
            "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "tokens_per_second": vision.tokens_per_second,
        }
        config_class = Qwen2_5_VLConfig
    return config_class(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=text.tie_word_embeddings,
        **token_ids,
    )


def build_processor(preset: Preset, tokenizer: Qwen2Tokenizer) -> ProcessorMixin:
    """Qwen2-VL / Qwen2.5-VL processor with the preset's pixel budget for both images and videos."""
    vision = preset.vision
    patching = {
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
    }
    size = {"shortest_edge": preset.min_pixels, "longest_edge": preset.max_pixels}
    return _PROCESSOR_CLASSES[preset.arch](
        image_processor=Qwen2VLImageProcessor(size=size, **patching),
        video_processor=Qwen2VLVideoProcessor(size=size, **patching),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
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

    `dtype` None means the preset's default (float32 for tiny/small, bfloat16 for 3b). The weights are
    a function of (preset, seed, dtype, device): CPU and CUDA draw different random streams.
    """
    spec = get_preset(arch, preset)
    dtype = dtype or spec.default_dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(spec.tokenizer_vocab_size)
    config = build_config(spec, tokenizer)
    torch_device = torch.device(device)
    # fork_rng restores the caller's RNG (CPU and, when building there, the one CUDA device) afterwards.
    cuda_devices = [torch_device.index or 0] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), torch_device:
        torch.manual_seed(seed)
        model = MODEL_CLASSES[arch]._from_config(config, dtype=_DTYPES[dtype])
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
