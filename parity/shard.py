"""``--shard K/N``: the K-th of N deterministic, balanced slices of a prompt file.

**Balance.** A prompt's weight is the number of UTF-8 bytes of the text the model reads (``text``,
``instruct`` and an ICL clip's ``ref_text``). Decode time follows the length of the speech, and
bytes track it across scripts better than characters do (a Chinese character is three bytes and
about three times as much speech as a Latin letter). Prompts are dealt longest first, each to the
lightest shard so far, ties broken by prompt id and then by the lower shard number (the
longest-processing-time rule), so the split depends only on the prompts: not on the process, the
hash seed or the order of the file. Within a shard the prompts keep the file's order.

**Where K/N comes from**, first match wins:

1. ``--shard K/N`` on the command line;
2. ``PARITY_SHARD=K/N`` in the environment (set it from a CI matrix variable, e.g. GitHub
   Actions ``PARITY_SHARD: ${{ matrix.shard }}/4``);
3. only with ``--shard auto``, the job-array variables of the scheduler:
   ``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_COUNT`` (and ``SLURM_ARRAY_TASK_MIN``, so an
   array numbered 0-3 or 1-4 both give shards 1-4), then GitLab CI's ``parallel:`` jobs
   (``CI_NODE_INDEX`` of ``CI_NODE_TOTAL``, 1-based).

Scheduler variables are read only when asked for (``--shard auto``): a job array that runs a
different recipe per task must not be sharded behind its back. K is 1-based: 1 <= K <= N.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Mapping

from parity.errors import BadInput
from parity.prompts import Prompt

ENV = "PARITY_SHARD"
AUTO = "auto"
_SPEC = re.compile(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*")
FIX = "write it as K/N with 1 <= K <= N, e.g. --shard 2/4"


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` (1-based) of ``count``; ``source`` says where it came from."""

    index: int
    count: int
    source: str = "--shard"

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str, source: str = "--shard") -> ShardSpec:
    """``K/N`` -> ShardSpec; one-line BadInput naming ``source`` for anything else."""
    m = _SPEC.fullmatch(text or "")
    given = f"{source}{text!r}" if source.endswith("=") else f"{source} {text!r}"
    if not m:
        raise BadInput(f"{given} is not a shard; {FIX}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise BadInput(f"{given} is out of range (shard {k} of {n}); {FIX}")
    return ShardSpec(k, n, source)


def _whole(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    if not value.strip().isdigit():
        raise BadInput(f"{name}={value!r} is not a whole number, so --shard auto cannot use it; set {ENV}=K/N instead")
    return int(value)


def _from_scheduler(env: Mapping[str, str]) -> ShardSpec | None:
    if env.get("SLURM_ARRAY_TASK_ID") is not None:
        if env.get("SLURM_ARRAY_TASK_COUNT") is None:
            raise BadInput("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not (a SLURM older than 18.08?); "
                           f"set {ENV}=K/N instead")
        task, count = _whole(env, "SLURM_ARRAY_TASK_ID"), _whole(env, "SLURM_ARRAY_TASK_COUNT")
        first = _whole(env, "SLURM_ARRAY_TASK_MIN") if env.get("SLURM_ARRAY_TASK_MIN") is not None else 0
        step = _whole(env, "SLURM_ARRAY_TASK_STEP") if env.get("SLURM_ARRAY_TASK_STEP") is not None else 1
        if step < 1 or (task - first) % step:
            raise BadInput(f"SLURM_ARRAY_TASK_ID={task} is not on the array's grid (min {first}, step {step}); "
                           f"set {ENV}=K/N instead")
        label = f"{(task - first) // step + 1}/{count}"
        return parse_shard(label, f"SLURM_ARRAY_TASK_ID={task} (min {first}, count {count}) gives shard")
    if env.get("CI_NODE_INDEX") is not None or env.get("CI_NODE_TOTAL") is not None:
        label = f"{_whole(env, 'CI_NODE_INDEX')}/{_whole(env, 'CI_NODE_TOTAL')}"
        return parse_shard(label, "CI_NODE_INDEX/CI_NODE_TOTAL give shard")
    return None


def resolve_shard(flag: str | None, env: Mapping[str, str]) -> ShardSpec | None:
    """The shard to run, from ``--shard`` (``K/N`` or ``auto``) and the environment (see the
    module docstring for the precedence), or None for the whole file."""
    if flag is not None and flag.strip().lower() != AUTO:
        return parse_shard(flag, "--shard")
    if env.get(ENV):
        return parse_shard(env[ENV], f"{ENV}=")
    if flag is None:
        return None
    found = _from_scheduler(env)
    if found is None:
        raise BadInput(f"--shard auto found no shard in the environment ({ENV}, SLURM_ARRAY_TASK_ID/"
                       "SLURM_ARRAY_TASK_COUNT or CI_NODE_INDEX/CI_NODE_TOTAL); set one or pass --shard K/N")
    return found


def prompt_weight(p: Prompt) -> int:
    """The balancing weight of a prompt: UTF-8 bytes of the text the model reads."""
    return sum(len((s or "").encode("utf-8")) for s in (p.text, p.instruct, p.ref_text))


def assign(prompts: list[Prompt], count: int) -> dict[str, int]:
    """Prompt id -> its shard (1-based) for ``count`` shards: longest first into the lightest."""
    bins = [(0, k) for k in range(1, count + 1)]  # (load, shard): the heap pops the lightest, then the lowest shard
    heapq.heapify(bins)
    out: dict[str, int] = {}
    for p in sorted(prompts, key=lambda p: (-prompt_weight(p), p.id)):
        load, k = heapq.heappop(bins)
        out[p.id] = k
        heapq.heappush(bins, (load + prompt_weight(p), k))
    return out


def check_fits(spec: ShardSpec, prompts: list[Prompt], where: str) -> None:
    """Every shard must get at least one prompt: N may not exceed the number of prompts."""
    if spec.count > len(prompts):
        raise BadInput(f"{spec.source} {spec.label}: {where} has {len(prompts)} prompt(s), so at most "
                       f"{len(prompts)} shards can each get one; use N <= {len(prompts)}")


def select(prompts: list[Prompt], spec: ShardSpec) -> list[Prompt]:
    """The prompts of shard ``spec``, in file order."""
    owner = assign(prompts, spec.count)
    return [p for p in prompts if owner[p.id] == spec.index]


def shard_record(spec: ShardSpec, prompts: list[Prompt], prompts_file: str, full_digest: str) -> dict:
    """What a shard run records about itself (``parity.results.Shard``'s JSON): the shard, the
    digest of the whole prompt file, and every prompt of the file with its shard, so that
    ``parity merge`` can name the prompts of a shard that never arrived."""
    owner = assign(prompts, spec.count)
    return {
        "index": spec.index, "count": spec.count, "source": spec.source, "prompts_file": prompts_file,
        "prompts_digest": full_digest, "total_prompts": len(prompts),
        "weight": sum(prompt_weight(p) for p in prompts if owner[p.id] == spec.index),
        "assignment": [{"id": p.id, "text": p.text, "line": p.line, "shard": owner[p.id]} for p in prompts],
    }
