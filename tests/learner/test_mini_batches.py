"""The split of a rollout batch into optimizer mini-batches, and the config checks of the learner-side switches.

Invariants: a mini-batch holds whole prompt groups (never part of a uid's n samples), groups keep their order and
the sizes differ by at most one group; too few groups is an error naming the field; `old_logprobs=recompute` is
refused in async mode; a step must hold at least `mini_batches_per_step` prompts.
"""

from __future__ import annotations

import pytest

from vzero.batching import split_mini_batches
from vzero.config import ConfigError, load_config
from vzero.records import Trajectory


def _traj(uid: str, i: int, tokens: int = 2) -> Trajectory:
    return Trajectory(
        uid=uid,
        sample_index=i,
        policy_version=0,
        prompt_ids=[1, 2],
        response_ids=[3] * tokens,
        lp_old=[-1.0] * tokens,
        finish_reason="stop",
    )


def _ids(minis: list[list[Trajectory]]) -> list[list[tuple[str, int]]]:
    return [[(t.uid, t.sample_index) for t in m] for m in minis]


def test_mini_batches_hold_whole_prompt_groups_in_order():
    batch = [_traj(u, i) for u in "abcde" for i in range(2)]
    assert _ids(split_mini_batches(batch, 1)) == [[(t.uid, t.sample_index) for t in batch]]
    # 5 groups in 2: the first mini-batch takes the extra group (like verl's in-order PPO mini-batches).
    assert _ids(split_mini_batches(batch, 2)) == [
        [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)],
        [("d", 0), ("d", 1), ("e", 0), ("e", 1)],
    ]
    assert [len(m) for m in split_mini_batches(batch, 5)] == [2] * 5


def test_interleaved_groups_are_never_cut():
    batch = [_traj("a", 0), _traj("b", 0), _traj("a", 1), _traj("b", 1)]
    assert _ids(split_mini_batches(batch, 2)) == [[("a", 0), ("a", 1)], [("b", 0), ("b", 1)]]


def test_fewer_groups_than_mini_batches_names_the_fields():
    with pytest.raises(ValueError, match=r"learner.mini_batches_per_step=3 needs at least 3 prompt groups.*got 2"):
        split_mini_batches([_traj("a", 0), _traj("b", 0)], 3)


def test_recompute_is_refused_in_async_mode():
    with pytest.raises(ConfigError, match=r"loss\.old_logprobs=recompute with mode=async"):
        load_config(None, ["mode=async", "loss.old_logprobs=recompute"])
    assert load_config(None, ["mode=async", "loss.old_logprobs=sampler"]).loss.old_logprobs == "sampler"
    assert load_config(None, ["mode=async"]).loss.old_logprobs == "auto"


def test_more_mini_batches_than_prompts_is_refused():
    with pytest.raises(ConfigError, match=r"learner.mini_batches_per_step \(4\) must be <= rollout.prompts_per_step"):
        load_config(None, ["rollout.prompts_per_step=3", "learner.mini_batches_per_step=4"])
    with pytest.raises(ConfigError, match=r"learner\.mini_batches_per_step"):
        load_config(None, ["learner.mini_batches_per_step=0"])
