"""``--shard K/N``: the split of a prompt file (coverage, balance, determinism) and where K/N comes
from (flag, PARITY_SHARD, scheduler variables), on synthetic prompt lists: no model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.errors import BadInput
from parity.prompts import Prompt
from parity.shard import ShardSpec, assign, parse_shard, prompt_weight, resolve_shard, select, shard_record

REPO = Path(__file__).resolve().parents[2]

texts = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40)


@st.composite
def prompt_lists(draw):
    items = draw(st.lists(texts, min_size=1, max_size=30))
    return [Prompt(id=f"p{i:03d}", text=t, line=i + 1) for i, t in enumerate(items)]


@given(prompt_lists(), st.data())
@settings(max_examples=200, deadline=None)
def test_shards_cover_every_prompt_exactly_once(prompts, data):
    n = data.draw(st.integers(1, len(prompts)), label="N")
    slices = [select(prompts, ShardSpec(k, n)) for k in range(1, n + 1)]
    ids = [p.id for s in slices for p in s]
    assert sorted(ids) == sorted(p.id for p in prompts)  # every prompt, none twice
    assert all(slices), "N <= number of prompts: every shard gets at least one prompt"
    for s in slices:  # file order within a shard
        assert [p.line for p in s] == sorted(p.line for p in s)


@given(prompt_lists(), st.data())
@settings(max_examples=200, deadline=None)
def test_shards_are_balanced_by_prompt_length(prompts, data):
    """Longest-first into the lightest: the heaviest and lightest shard differ by at most the
    weight of one prompt (the largest)."""
    n = data.draw(st.integers(1, len(prompts)), label="N")
    owner = assign(prompts, n)
    loads = [sum(prompt_weight(p) for p in prompts if owner[p.id] == k) for k in range(1, n + 1)]
    assert max(loads) - min(loads) <= max(prompt_weight(p) for p in prompts)


@given(prompt_lists(), st.randoms(use_true_random=False), st.data())
@settings(max_examples=100, deadline=None)
def test_the_split_does_not_depend_on_the_order_of_the_file(prompts, rnd, data):
    n = data.draw(st.integers(1, len(prompts)), label="N")
    shuffled = list(prompts)
    rnd.shuffle(shuffled)
    assert assign(shuffled, n) == assign(prompts, n)


def test_weight_counts_utf8_bytes_of_what_the_model_reads():
    assert prompt_weight(Prompt("a", "abc")) == 3
    assert prompt_weight(Prompt("a", "其实")) == 6
    assert prompt_weight(Prompt("a", "ab", instruct="cd", ref_audio="x.wav", ref_text="efg")) == 7


def test_a_known_split():
    """Weights 52, 28, 27, 6 over 2 shards: 52 -> 1, 28 -> 2, 27 -> 2, 6 -> 1 (55 vs 58)."""
    prompts = [Prompt("p0", "x" * 28), Prompt("p1", "x" * 52), Prompt("p2", "x" * 6), Prompt("p3", "x" * 27)]
    assert assign(prompts, 2) == {"p1": 1, "p0": 2, "p3": 2, "p2": 1}
    assert [p.id for p in select(prompts, ShardSpec(1, 2))] == ["p1", "p2"]
    record = shard_record(ShardSpec(2, 2), prompts, "f.txt", "d")
    assert record["weight"] == 55 and record["total_prompts"] == 4
    assert [a["shard"] for a in record["assignment"]] == [2, 1, 1, 2]


def test_the_split_is_the_same_under_any_hash_seed():
    code = ("import json; from parity.prompts import Prompt; from parity.shard import assign; "
            "print(json.dumps(assign([Prompt(f'p{i}', 'ab' * (i % 4) + 'x') for i in range(40)], 7), sort_keys=True))")
    outs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        outs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout)
    assert len(outs) == 1 and json.loads(outs.pop())


@pytest.mark.parametrize("text, expected", [("1/1", (1, 1)), ("3/4", (3, 4)), (" 2 / 5 ", (2, 5))])
def test_parse_shard(text, expected):
    s = parse_shard(text)
    assert (s.index, s.count) == expected


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", "-1/2", "", "1/2/3", "1.0/2"])
def test_bad_shards_are_one_line(text):
    with pytest.raises(BadInput) as e:
        parse_shard(text)
    assert "\n" not in str(e.value) and "K/N" in str(e.value)


def test_precedence_flag_then_parity_shard_then_scheduler_only_with_auto():
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    env = {"PARITY_SHARD": "2/4", **slurm}
    assert resolve_shard("1/2", env).label == "1/2"  # the flag wins
    assert resolve_shard(None, env).label == "2/4"  # PARITY_SHARD applies without a flag
    assert resolve_shard("auto", env).label == "2/4"  # and before the scheduler's
    assert resolve_shard(None, slurm) is None  # a job array alone does not shard a run
    assert resolve_shard("auto", slurm).label == "2/3"  # task 5 of an array 4..6 is the 2nd of 3
    assert resolve_shard("auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}).label == "1/2"
    assert resolve_shard("auto", {"CI_NODE_INDEX": "3", "CI_NODE_TOTAL": "3"}).label == "3/3"
    assert resolve_shard(None, {}) is None


@pytest.mark.parametrize("flag, env", [
    ("auto", {}),
    ("auto", {"SLURM_ARRAY_TASK_ID": "7"}),
    ("auto", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}),
    ("auto", {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "2"}),  # outside the array
    ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"}),
    ("auto", {"CI_NODE_INDEX": "0", "CI_NODE_TOTAL": "2"}),  # GitLab counts from 1
    (None, {"PARITY_SHARD": "3/2"}),
])
def test_bad_environment_is_one_line(flag, env):
    with pytest.raises(BadInput) as e:
        resolve_shard(flag, env)
    assert "\n" not in str(e.value)


def test_parse_devices():
    from parity.workers import parse_devices

    assert parse_devices("cpu,cpu", 0) == ["cpu", "cpu"]
    assert parse_devices("all", 2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:1, cuda:0", 2) == ["cuda:1", "cuda:0"]
    assert parse_devices("cuda", 1) == ["cuda:0"]
    for bad, count in (("all", 0), ("cuda:2", 2), ("gpu", 1), ("cpu,cuda:0", 1), ("", 1), ("cuda:x", 1), ("cpu,,cpu", 0)):
        with pytest.raises(BadInput) as e:
            parse_devices(bad, count)
        assert "\n" not in str(e.value) and "--devices" in str(e.value)
