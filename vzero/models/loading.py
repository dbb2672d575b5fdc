"""Load a user's Qwen-VL model directory (processor, model) for the learner and the tests.

Contract: everything here reads local directories only (`local_files_only=True`; a hub id or a missing
directory is an error, never a download) and loads safetensors only (`use_safetensors=True`), because a
pickle checkpoint (`pytorch_model.bin`) can run arbitrary code when unpickled. It also answers the two
questions other parts ask about a processor: which id is the image placeholder (`image_token_id`), and
which ids a sampler must never emit (`vision_token_ids`).

Knows nothing about training, sampling or how the directory was made (`vzero.models.tiny` or a hub
snapshot copied in by hand are the same to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from vzero.models.tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_PAD, VISION_START

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_CONVERT_HINT = (
    'only safetensors checkpoints are loaded; convert with: python -c "from transformers import '
    "AutoModelForImageTextToText as M; M.from_pretrained('{path}', use_safetensors=False)"
    ".save_pretrained('{path}-safetensors')\" (only for a checkpoint you trust: unpickling runs code)"
)


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """`"auto"` is bfloat16 on CUDA and float32 on CPU (CPU bf16 matmuls are slow without AVX512-BF16)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {['auto', *_DTYPES]}") from None


def _model_dir(path: str | Path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model directory {str(directory)!r} does not exist (only local directories are loaded; "
            "build one with `vzero model tiny --out DIR` or copy a hub snapshot there)"
        )
    return directory


def safetensors_files(path: str | Path) -> list[Path]:
    """The directory's safetensors weight files; raises if there are none (e.g. only pytorch_model.bin)."""
    directory = _model_dir(path)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"no *.safetensors in {str(directory)!r} (found {found}): " + _CONVERT_HINT.format(path=directory)
        )
    return files


def checkpoint_num_params(path: str | Path) -> int:
    """Parameters stored in the directory's safetensors files (tied weights count once), read from headers."""
    total = 0
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                shape = f.get_slice(name).get_shape()
                total += int(torch.Size(shape).numel())
    return total


def load_processor(
    path: str | Path,
    *,
    trust_remote_code: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ProcessorMixin:
    """The directory's processor; `min_pixels`/`max_pixels` override the image pixel budget.

    vLLM must see the same budget (pass it as `mm_processor_kwargs`), or its image-pad counts differ from
    the learner's.
    """
    directory = _model_dir(path)
    processor = AutoProcessor.from_pretrained(
        str(directory), local_files_only=True, trust_remote_code=trust_remote_code
    )
    if min_pixels is not None or max_pixels is not None:
        image_processor = processor.image_processor
        size = dict(image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']}")
        image_processor.size = type(image_processor.size)(**size)
    return processor


def load_model(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The directory's image-text-to-text model on `device`, in eval mode.

    The weights are read on CPU and then moved: this needs no `accelerate` (transformers requires it for
    `device_map`), at the cost of one host copy (a few seconds for a 3B model).
    """
    directory = _model_dir(path)
    safetensors_files(directory)  # refuse pickle-only directories before transformers looks for .bin
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(
        str(directory),
        dtype=resolve_dtype(dtype, device),
        use_safetensors=True,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    return model.to(device).eval()


def _tokenizer_of(processor_or_tokenizer: Any) -> Any:
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ValueError(f"the tokenizer has no {token!r} token: is this a Qwen-VL processor?")
    return int(token_id)


def image_token_id(processor_or_tokenizer: Any) -> int:
    """Id of `<|image_pad|>`, the placeholder the processor repeats once per merged image patch."""
    return _token_id(_tokenizer_of(processor_or_tokenizer), IMAGE_PAD)


def vision_token_ids(processor_or_tokenizer: Any) -> list[int]:
    """Ids of the vision placeholders and delimiters (image/video pad, vision start/end/pad), sorted.

    A sampler must never emit these: an emitted `<|image_pad|>` makes the next forward pass look for an
    image that does not exist.
    """
    tokenizer = _tokenizer_of(processor_or_tokenizer)
    return sorted(_token_id(tokenizer, t) for t in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, VISION_PAD))
