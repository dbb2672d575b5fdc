"""Config: YAML + overrides, unknown keys rejected with hints, every shipped YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzero.config import ConfigError, TrainConfig, dump_config, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_validates_and_starts_with_its_command(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert path.read_text().startswith("#"), "a shipped config opens with a comment giving the command"
    assert "vzero train --config" in path.read_text().splitlines()[1] + path.read_text().splitlines()[0]


def test_overrides_are_parsed_as_yaml_and_nested() -> None:
    assert parse_overrides(["rollout.n=4", "gate.level=token", "ray.address=null", "learner.betas=[0.8, 0.9]"]) == {
        "rollout": {"n": 4},
        "gate": {"level": "token"},
        "ray": {"address": None},
        "learner": {"betas": [0.8, 0.9]},
    }
    cfg = load_config(REPO / "configs/tiny-cpu.yaml", ["steps=3", "output_dir=/tmp/x", "rollout.n=2"])
    assert (cfg.steps, cfg.output_dir, cfg.rollout.n) == (3, "/tmp/x", 2)
    assert cfg.rollout.num_samplers == 2  # untouched keys keep the file's values


def test_unknown_key_is_rejected_with_a_did_you_mean_hint() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.nn: unknown key \(did you mean 'rollout\.n'\?\)"):
        load_config(None, ["rollout.nn=3"])


def test_all_problems_are_reported_in_one_message() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["rollout.n=0", "gate.w_min=3", "bogus=1", "loss.mode=k1"])
    msg = str(info.value)
    assert "4 problem(s)" in msg
    assert "rollout.n: Input should be greater than or equal to 1 (got 0)" in msg
    assert "w_min (3.0) must be <= w_max (2.0)" in msg
    assert "bogus: unknown key" in msg
    assert "loss.mode" in msg and "k1_pg" in msg


def test_cross_field_checks_say_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="mode=async needs max_staleness >= 1"):
        load_config(None, ["mode=async", "max_staleness=0"])
    with pytest.raises(ConfigError, match="raise max_model_len or lower max_tokens"):
        load_config(None, ["rollout.max_tokens=5000"])
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 needs rollout\.resources\.num_gpus >= 2"):
        load_config(None, ["rollout.vllm.tensor_parallel_size=2", "rollout.resources.num_gpus=1"])
    with pytest.raises(ConfigError, match=r"min_pixels .* must be <= max_pixels"):
        load_config(None, ["student.min_pixels=100000", "student.max_pixels=1000"])


def test_bad_override_syntax_and_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"not of the form key\.sub=value"):
        load_config(None, ["rollout.n"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/tiny-cpu.yaml", ["gate.level=token"])
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_teacher_defaults_to_student_model_and_safe_defaults() -> None:
    cfg = load_config(None)
    assert cfg.teacher_model == cfg.student
    assert cfg.student.trust_remote_code is False
    assert cfg.gate.level == "sequence" and cfg.loss.mode == "k1_pg"
    assert (cfg.gate.gamma, cfg.gate.alpha, cfg.gate.w_min, cfg.gate.w_max) == (1.0, 0.5, 0.0, 2.0)


def test_every_field_has_a_description() -> None:
    """Every config field documents itself (meaning, units, interactions), as vLLM's validate_config enforces."""
    missing = []

    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = [
                a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and hasattr(a, "model_fields")
            ]
            if sub:
                walk(sub[0], f"{prefix}{name}.")
            elif not field.description:
                missing.append(prefix + name)

    walk(TrainConfig, "")
    assert not missing, f"fields without a docstring: {missing}"


def test_shuffle_control_needs_an_enabled_sequence_gate() -> None:
    assert load_config(None, ["gate.shuffle_control=true"]).gate.shuffle_control
    for bad in (["gate.level=token"], ["gate.enabled=false"]):
        with pytest.raises(ConfigError, match="shuffle_control permutes sequence weights"):
            load_config(None, ["gate.shuffle_control=true", *bad])
