"""What a job prints (vzero/console.py): the actors' quiet environment, the notice filter, the per-step line."""

from __future__ import annotations

import logging

import pytest

from vzero.console import KNOWN_NOTICES, QUIET_ENV, actor_runtime_env, progress_line, quiet_worker


def test_quiet_runtime_env_keeps_the_users_own_variables_and_verbose_adds_nothing(monkeypatch) -> None:
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    base = {"PYTHONPATH": "/repo"}
    quiet = actor_runtime_env(False, base)
    assert quiet["env_vars"]["PYTHONPATH"] == "/repo"
    assert "VLLM_LOGGING_LEVEL" not in quiet["env_vars"], "the user's own setting wins (and Ray refuses duplicates)"
    assert {k: quiet["env_vars"][k] for k in QUIET_ENV if k != "VLLM_LOGGING_LEVEL"} == {
        k: v for k, v in QUIET_ENV.items() if k != "VLLM_LOGGING_LEVEL"
    }
    assert quiet["worker_process_setup_hook"] == "vzero.console.quiet_worker"
    assert actor_runtime_env(True, base) == {"env_vars": base}


@pytest.fixture
def restore_filters():
    before = {name: list(logging.getLogger(name).filters) for name in KNOWN_NOTICES}
    yield
    for name, filters in before.items():
        logging.getLogger(name).filters = filters


def test_quiet_worker_drops_only_the_known_notices(restore_filters, caplog) -> None:
    quiet_worker()
    cpu_worker = logging.getLogger("vllm.v1.worker.cpu_worker")
    with caplog.at_level(logging.WARNING):
        cpu_worker.warning("%s is not found in LD_PRELOAD. For best performance, ...", "libtcmalloc")
        cpu_worker.warning("CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding")
        cpu_worker.warning("KV cache of 0 blocks: the model does not fit")
        logging.getLogger("vllm.v1.engine.core").warning("Enforce eager set, but from another module")
    assert [r.getMessage() for r in caplog.records] == [
        "KV cache of 0 blocks: the model does not fit",
        "Enforce eager set, but from another module",
    ]


def test_progress_line_is_one_compact_line_with_loss_weight_and_seconds() -> None:
    m = {
        "loss": -0.0078,
        "gate/weight_mean": 1.0,
        "gate/weight_min": 0.2,
        "gate/weight_max": 1.78,
        "gate/frac_delta_pos": 0.5,
        "rollout/tokens_per_s": 1613.2,
        "step/seconds": 0.43,
    }
    assert progress_line(4, 10, m) == "step 4/10  loss -0.0078  w 1.00 [0.20, 1.78]  Δ>0 50%  1613 tok/s  0.4 s"
    assert progress_line(1, 2, {"loss": 0.5}) == "step 1/2  loss +0.5000  0.0 s"
