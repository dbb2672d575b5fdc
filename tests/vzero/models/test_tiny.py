"""Random-init Qwen-VL model directories: build, determinism, tokenizer, transformers loading, CLI.

Builds the real tiny models (well under a second each) and runs them with real transformers on CPU.
vLLM loading is in test_vllm_load.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach for the hub

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from vzero.models import commands
from vzero.models.loading import (
    checkpoint_num_params,
    image_token_id,
    load_model,
    load_processor,
    resolve_dtype,
    vision_token_ids,
)
from vzero.models.presets import ARCHS, get_preset
from vzero.models.tiny import MODEL_CLASSES, build_config, build_model
from vzero.models.tokenizer import ANSWER_WORDS, IM_END, IMAGE_PAD, SPECIAL_TOKENS, build_tokenizer

QUESTION = "What color is the small square? Answer with one word."


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny directory per architecture, seed 0."""
    return {arch: build_model(tmp_path_factory.mktemp(arch), arch=arch, seed=0) for arch in ARCHS}


def _image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _chat(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_directory_loads_with_auto_classes(model_dirs: dict[str, Path], arch: str) -> None:
    config = AutoConfig.from_pretrained(model_dirs[arch], local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dirs[arch], local_files_only=True)
    assert config.model_type == arch
    assert type(processor).__name__ == {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[arch]
    assert processor.video_processor is not None
    assert processor.image_processor.size["longest_edge"] == 224 * 224
    generation = json.loads((model_dirs[arch] / "generation_config.json").read_text())
    tok = processor.tokenizer
    assert generation["eos_token_id"] == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert generation["pad_token_id"] == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


@pytest.mark.parametrize("arch", ARCHS)
def test_special_tokens_are_the_last_ids_and_fill_the_vocab(model_dirs: dict[str, Path], arch: str) -> None:
    config = AutoConfig.from_pretrained(model_dirs[arch], local_files_only=True)
    processor = load_processor(model_dirs[arch])
    tok = processor.tokenizer
    vocab = config.text_config.vocab_size
    assert len(tok) == vocab == 512  # no logit without a token
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(vocab - 14, vocab))
    assert tok.eos_token == IM_END
    assert image_token_id(processor) == image_token_id(tok) == config.image_token_id == processor.image_token_id
    expected = {
        config.image_token_id,
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
        tok.convert_tokens_to_ids("<|vision_pad|>"),
    }
    assert vision_token_ids(processor) == sorted(expected)


def test_answer_words_are_single_tokens() -> None:
    tok = build_tokenizer(512)
    for word in ANSWER_WORDS:
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
        if not word.isdigit():  # Qwen's split puts a space before a digit in its own token
            assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
    # A one-word answer as the policy writes it: the word, then <|im_end|>.
    assert tok.convert_ids_to_tokens(tok.encode(f"red{IM_END}", add_special_tokens=False)) == ["red", IM_END]


def test_tokenizer_is_deterministic_and_refuses_sizes_the_corpus_cannot_fill(tmp_path) -> None:
    build_tokenizer(512, tmp_path / "a")
    build_tokenizer(512, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with pytest.raises(ValueError, match="supports a BPE of at most"):
        build_tokenizer(4096)


def test_chat_template_renders_one_image_pad_that_the_processor_expands(model_dirs: dict[str, Path]) -> None:
    processor = load_processor(model_dirs["qwen2_vl"])
    text = _chat(processor)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.count(IMAGE_PAD) == 1
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    inputs = processor(text=[text], images=[_image(70, 90, 0)], return_tensors="pt")
    # 70x90 resizes to 56x84 (multiples of 28): a 4x6 patch grid, merged 2x2 into 6 pads.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert int((inputs["input_ids"] == image_token_id(processor)).sum()) == 6


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, model_dirs: dict[str, Path]) -> None:
    # A fresh interpreter, through the standalone CLI: BPE training must not depend on hash seeds.
    again = tmp_path / "again"
    cmd = [sys.executable, "-m", "vzero.models.commands", "model", "tiny", "--out", str(again), "--seed", "0"]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "random"})
    other = build_model(tmp_path / "other", arch="qwen2_vl", seed=1)
    first = model_dirs["qwen2_vl"]
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    for name in ("config.json", "tokenizer.json", "processor_config.json", "generation_config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name


def test_build_leaves_the_callers_rng_alone(tmp_path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(tmp_path / "m", arch="qwen2_5_vl", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_generates_from_an_image_and_sees_it(model_dirs: dict[str, Path], arch: str) -> None:
    processor = load_processor(model_dirs[arch])
    model = load_model(model_dirs[arch])
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    text = _chat(processor)
    inputs = processor(text=[text], images=[_image(112, 140, 1)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new) <= 8 and int(new.max()) < model.config.text_config.vocab_size
    # The vision tower is wired in: another image changes the next-token distribution.
    other = processor(text=[text], images=[_image(112, 140, 2)], return_tensors="pt")
    with torch.no_grad():
        a = model(**inputs).logits[0, -1]
        b = model(**other).logits[0, -1]
    assert (a - b).abs().max() > 1e-4


def test_load_processor_overrides_the_pixel_budget(model_dirs: dict[str, Path]) -> None:
    processor = load_processor(model_dirs["qwen2_5_vl"], max_pixels=56 * 56)
    inputs = processor(text=[_chat(processor)], images=[_image(224, 224, 0)], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 224x224 shrunk to 56x56
    with pytest.raises(ValueError, match="min_pixels"):
        load_processor(model_dirs["qwen2_5_vl"], min_pixels=100_000, max_pixels=56 * 56)


def test_loading_refuses_pickle_checkpoints_and_missing_dirs(tmp_path, model_dirs: dict[str, Path]) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (pickled / name).write_bytes((model_dirs["qwen2_vl"] / name).read_bytes())
    torch.save({"lm_head.weight": torch.zeros(512, 128)}, pickled / "pytorch_model.bin")
    with pytest.raises(
        FileNotFoundError, match=r"'pytorch_model\.bin'.*only safetensors checkpoints are loaded; convert with"
    ):
        load_model(pickled)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_processor("Qwen/Qwen2-VL-2B-Instruct")  # a hub id is not a local directory


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="not one of"):
        resolve_dtype("fp8", "cpu")


@pytest.mark.parametrize(
    ("arch", "expected"),
    # Qwen2.5-VL-3B-Instruct's index.json: total_size 7,509,245,952 bytes in bf16 = 3,754,622,976 parameters.
    [("qwen2_5_vl", 3_754_622_976), ("qwen2_vl", None)],
)
def test_3b_presets_have_the_released_shapes(arch: str, expected: int | None) -> None:
    config = build_config(get_preset(arch, "3b"), build_tokenizer(512))
    with torch.device("meta"):
        model = MODEL_CLASSES[arch]._from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as released
    assert config.text_config.vocab_size == 151936
    if expected is not None:
        assert n == expected
    else:  # Qwen2-VL-2B-Instruct ("2.2B")
        assert 2.15e9 < n < 2.25e9


def test_cli_prints_one_json_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert commands.main(["model", "tiny", "--out", str(out), "--arch", "qwen2_5_vl", "--seed", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["arch"] == "qwen2_5_vl" and record["preset"] == "tiny" and record["dtype"] == "float32"
    model = load_model(out)
    assert record["params"] == checkpoint_num_params(out) == sum(p.numel() for p in model.parameters())
    assert record["path"] == str(out.resolve())
