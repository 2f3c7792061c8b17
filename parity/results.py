"""Typed, versioned results: what ``summary.json``, ``results/<id>.json``, ``compare.json`` and
``bisect.json`` hold, as dataclass records with ``to_json`` / ``from_json``.

Field names are the JSON keys, so a record and its JSON read the same (and the report template,
which uses attribute access, reads either). Numbers that can be non-finite are ``float | None``
(JSON has no inf/NaN); the typed field next to them says why one is missing (``nonfinite``,
``nonfinite_points``), never a string sentinel. Keys a record does not know are kept in ``extra``
and written back unchanged, so a newer writer's additions survive a round trip.

``SCHEMA_VERSION`` is the version of this layout; ``parity/schema/summary.schema.json`` is its
JSON Schema. Version 1 is the untyped layout before it (``"inf"`` strings); :meth:`Summary.from_json`
reads both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 2


def finite_or_none(v: Any) -> float | None:
    """A JSON-safe float: finite values as float, inf/NaN/None/"inf" (schema 1) as None."""
    if v is None or isinstance(v, bool) or isinstance(v, str):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _rel(d: "Divergence") -> str:
    return "inf (NaN/inf)" if d.nonfinite else ("-" if d.rel_l2 is None else f"{d.rel_l2:.2g}")


def _known(cls, data: dict) -> tuple[dict, dict]:
    """Split a JSON object into the record's own keys and the rest."""
    names = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


def _opt(cls, data):
    return None if data is None else cls.from_json(data)


@dataclass
class Point:
    """A compared point in execution order: talker step (substep -1) or predictor frame/sub-step,
    ``layer`` -1 for the input embedding, ``point`` its name (embed, layer7, logits)."""

    component: str
    step: int
    substep: int
    layer: int
    point: str

    def where(self) -> str:
        """'talker step 3 layer7' or 'predictor frame 2 sub-step 4 embed'."""
        if self.component == "talker":
            return f"talker step {self.step} {self.point}"
        return f"predictor frame {self.step} sub-step {self.substep} {self.point}"

    def to_json(self) -> dict:
        return {"component": self.component, "step": self.step, "substep": self.substep, "layer": self.layer, "point": self.point}

    @classmethod
    def from_json(cls, d: dict) -> "Point":
        return cls(str(d["component"]), int(d["step"]), int(d["substep"]), int(d.get("layer", -1)), str(d.get("point", "")))


@dataclass
class Divergence(Point):
    """The first point over tolerance. ``nonfinite``: NaN/inf there on either side, so the error
    metrics are unbounded and given as None."""

    rel_l2: float | None = None
    max_abs: float | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    tolerance: float = 0.0
    nonfinite: bool = False

    def to_json(self) -> dict:
        return {**super().to_json(), "rel_l2": self.rel_l2, "max_abs": self.max_abs, "cosine": self.cosine,
                "sqnr_db": self.sqnr_db, "tolerance": self.tolerance, "nonfinite": self.nonfinite}

    @classmethod
    def from_json(cls, d: dict) -> "Divergence":
        p = Point.from_json(d)
        rel = d.get("rel_l2")
        nonfinite = bool(d.get("nonfinite", isinstance(rel, str) or rel is None))  # schema 1 wrote "inf"
        return cls(p.component, p.step, p.substep, p.layer, p.point, finite_or_none(rel), finite_or_none(d.get("max_abs")),
                   finite_or_none(d.get("cosine")), finite_or_none(d.get("sqnr_db")), float(d.get("tolerance") or 0.0), nonfinite)


@dataclass
class Flip:
    """The first place where the teacher-forced candidate would have chosen another token."""

    component: str
    step: int
    substep: int
    ref_token: int
    cand_token: int
    ref_rank_in_cand: int  # 0 = the candidate's top choice
    cand_margin: float | None  # candidate logit of its choice minus its logit of the reference token
    ref_margin: float | None  # reference top-1 minus top-2 logit
    logit_error: float | None  # max |cand - ref| over the logits there
    logit_noise: float | None  # RMS of (cand - ref) over the logits there
    near_tie: bool  # label == "tie" (kept for readers of older summaries)
    noise_floor: float | None = None  # the independent noise scale of one logit (see compare.flip_label)
    floor_source: str = ""  # "tolerance" or "truth"
    logits_rel_l2: float | None = None  # relative L2 of the logits there
    label: str = ""  # "tie", "real" or "sampler" (see compare.flip_label); "" in summaries older than labels
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}, **self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "Flip":
        own, extra = _known(cls, d)
        for k in ("cand_margin", "ref_margin", "logit_error", "logit_noise", "noise_floor", "logits_rel_l2"):
            own[k] = finite_or_none(own.get(k))
        own.setdefault("near_tie", False)
        return cls(**own, extra=extra)


@dataclass
class Gate:
    """One gate on one prompt."""

    name: str
    passed: bool
    detail: str

    def to_json(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}

    @classmethod
    def from_json(cls, d: dict) -> "Gate":
        return cls(str(d["name"]), bool(d["passed"]), str(d.get("detail", "")))


@dataclass
class LayerError:
    """Mean relative-L2 error one layer adds on top of its input's, over the compared steps."""

    component: str
    layer: int
    mean_added_rel_l2: float | None

    def to_json(self) -> dict:
        return {"component": self.component, "layer": self.layer, "mean_added_rel_l2": self.mean_added_rel_l2}

    @classmethod
    def from_json(cls, d: dict) -> "LayerError":
        return cls(str(d["component"]), int(d["layer"]), finite_or_none(d.get("mean_added_rel_l2")))


@dataclass
class Agreement:
    """Free-running codes of the candidate against the reference's, over the common frames."""

    agreement: float | None
    codebook0_agreement: float | None
    first_diff_frame: int | None
    frames_compared: int

    def to_json(self) -> dict:
        return {"agreement": self.agreement, "codebook0_agreement": self.codebook0_agreement,
                "first_diff_frame": self.first_diff_frame, "frames_compared": self.frames_compared}

    @classmethod
    def from_json(cls, d: dict) -> "Agreement":
        return cls(finite_or_none(d.get("agreement")), finite_or_none(d.get("codebook0_agreement")),
                   d.get("first_diff_frame"), int(d.get("frames_compared") or 0))


@dataclass
class SublayerSplit:
    """The first diverging decoder layer split into its ops (``probes = "sublayers"``; see
    :mod:`parity.sublayers`). ``op`` names the op that adds the error (None: no single op);
    ``ops`` lists every op's error (``op``, ``label``, ``rel_l2``, ``max_abs``, ``identical``,
    ``reads_rel_l2``, ``adds``) from the layer input to the layer output."""

    component: str
    step: int
    substep: int
    layer: int
    op: str | None
    cause: str | None
    text: str
    tolerance: float
    ops: list[dict] = field(default_factory=list)
    cache: dict | None = None  # largest k/v error over the earlier recorded positions at this layer
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}, **self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "SublayerSplit":
        own, extra = _known(cls, d)
        return cls(str(own["component"]), int(own["step"]), int(own["substep"]), int(own["layer"]), own.get("op"),
                   own.get("cause"), str(own.get("text", "")), float(own.get("tolerance") or 0.0),
                   list(own.get("ops") or []), own.get("cache"), extra)


@dataclass
class LayerReplay:
    """The first diverging layer replayed across sides (see :mod:`parity.replay`): ``verdict``
    ``layer`` (it computes differently), ``input`` (its input already differed), ``within`` (within
    tolerance at the tolerance judged) or ``unreliable`` (the control did not reproduce the run). Errors are ``{rel_l2, max_abs, nonfinite}``."""

    at: dict
    verdict: str
    text: str
    tolerance: float
    added_in_isolation: float | None
    input: dict
    output: dict
    candidate_on_reference_input: dict
    control: dict
    reference_on_candidate_input: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}, **self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "LayerReplay":
        own, extra = _known(cls, d)
        own["added_in_isolation"] = finite_or_none(own.get("added_in_isolation"))
        own["tolerance"] = float(own.get("tolerance") or 0.0)
        return cls(**own, extra=extra)


@dataclass
class Comparison:
    """One prompt's teacher-forced comparison: where the candidate first leaves tolerance, and how.

    ``max_rel_l2`` is the largest finite relative L2; ``nonfinite_points`` counts the points where
    either side held NaN/inf (their error is unbounded). ``hints`` are dicts with at least ``text``
    (the signature hints); ``truth`` is the optional third-side judgement."""

    first_divergence: Divergence | None
    first_nonfinite: Point | None
    max_rel_l2: float | None
    nonfinite_points: int
    points_compared: int
    points_over: int
    bit_identical: bool
    added_per_layer: list[LayerError]
    first_flip: Flip | None
    ref_frames: int
    hints: list[dict]
    free_run: Agreement | None = None
    length_diff: int | None = None
    length_diff_is_bookkeeping: bool | None = None
    truth: dict | None = None
    first_nonfinite_reference: Point | None = None
    nonfinite_audio: dict = field(default_factory=dict)  # side -> {sample, seconds, count} or None
    sublayer: SublayerSplit | None = None  # probes = "sublayers": the first diverging layer, op by op
    replay: LayerReplay | None = None  # probes = "sublayers": that layer replayed across sides
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {
            "first_divergence": self.first_divergence.to_json() if self.first_divergence else None,
            "first_nonfinite": self.first_nonfinite.to_json() if self.first_nonfinite else None,
            "max_rel_l2": self.max_rel_l2, "nonfinite_points": self.nonfinite_points,
            "points_compared": self.points_compared, "points_over": self.points_over, "bit_identical": self.bit_identical,
            "added_per_layer": [r.to_json() for r in self.added_per_layer],
            "first_flip": self.first_flip.to_json() if self.first_flip else None,
            "ref_frames": self.ref_frames, "hints": self.hints,
        }
        if self.free_run is not None:
            out["free_run"] = self.free_run.to_json()
            out["length_diff"] = self.length_diff
            out["length_diff_is_bookkeeping"] = self.length_diff_is_bookkeeping
        if self.truth is not None:
            out["truth"] = self.truth
        out["first_nonfinite_reference"] = self.first_nonfinite_reference.to_json() if self.first_nonfinite_reference else None
        out["nonfinite_audio"] = self.nonfinite_audio
        if self.sublayer is not None:
            out["sublayer"] = self.sublayer.to_json()
        if self.replay is not None:
            out["replay"] = self.replay.to_json()
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "Comparison":
        own, extra = _known(cls, d)
        max_rel = own.get("max_rel_l2")
        return cls(
            first_divergence=_opt(Divergence, own.get("first_divergence")),
            first_nonfinite=_opt(Point, own.get("first_nonfinite")),
            max_rel_l2=finite_or_none(max_rel),
            nonfinite_points=int(own.get("nonfinite_points", 1 if isinstance(max_rel, str) else 0)),
            points_compared=int(own.get("points_compared") or 0), points_over=int(own.get("points_over") or 0),
            bit_identical=bool(own.get("bit_identical")),
            added_per_layer=[LayerError.from_json(r) for r in own.get("added_per_layer") or []],
            first_flip=_opt(Flip, own.get("first_flip")), ref_frames=int(own.get("ref_frames") or 0),
            hints=list(own.get("hints") or []), free_run=_opt(Agreement, own.get("free_run")),
            length_diff=own.get("length_diff"), length_diff_is_bookkeeping=own.get("length_diff_is_bookkeeping"),
            truth=own.get("truth"), first_nonfinite_reference=_opt(Point, own.get("first_nonfinite_reference")),
            nonfinite_audio=dict(own.get("nonfinite_audio") or {}),
            sublayer=_opt(SublayerSplit, own.get("sublayer")), replay=_opt(LayerReplay, own.get("replay")), extra=extra,
        )


STATUSES = ("ok", "not_run", "failed")


@dataclass
class PromptResult:
    """One prompt's verdict. ``status`` is ``ok`` (it ran; ``comparison`` is set), ``not_run``
    (never started: the run stopped first, or its shard is missing from a merge) or ``failed`` (a
    worker process died or its engine failed while running it). ``extra["reason"]`` says why a
    prompt did not run."""

    id: str
    text: str
    line: int | None
    status: str
    passed: bool
    gates: list[Gate] = field(default_factory=list)
    speaker: str | None = None
    language: str | None = None
    comparison: Comparison | None = None
    timing: dict = field(default_factory=dict)  # seconds: reference_s, forced_s, free_s
    audio: dict = field(default_factory=dict)  # side -> WAV path relative to the run directory
    codebook0: dict = field(default_factory=dict)  # side -> free-running codebook-0 sequence
    mos: dict | None = None  # parity.scoring.score_pairs's entry
    first_divergence_s: float | None = None
    first_diff_frame_s: float | None = None
    audible_from_s: float | None = None
    audible_threshold_db: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ran(self) -> bool:
        return self.status == "ok"

    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def to_json(self) -> dict:
        out: dict[str, Any] = {"id": self.id, "text": self.text, "line": self.line, "status": self.status}
        if not self.ran:
            return {**out, "gates": [g.to_json() for g in self.gates], "passed": self.passed, **self.extra}
        out.update({
            "speaker": self.speaker, "language": self.language,
            "comparison": self.comparison.to_json() if self.comparison else None,
            "gates": [g.to_json() for g in self.gates], "passed": self.passed, "timing": self.timing,
            "audio": self.audio, "codebook0": self.codebook0, "mos": self.mos,
        })
        if self.audible_threshold_db is not None:
            out.update({"first_divergence_s": self.first_divergence_s, "first_diff_frame_s": self.first_diff_frame_s,
                        "audible_from_s": self.audible_from_s, "audible_threshold_db": self.audible_threshold_db})
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "PromptResult":
        own, extra = _known(cls, d)
        return cls(
            id=str(own["id"]), text=str(own.get("text", "")), line=own.get("line"), status=str(own.get("status", "not_run")),
            passed=bool(own.get("passed")), gates=[Gate.from_json(g) for g in own.get("gates") or []],
            speaker=own.get("speaker"), language=own.get("language"), comparison=_opt(Comparison, own.get("comparison")),
            timing=dict(own.get("timing") or {}), audio=dict(own.get("audio") or {}), codebook0=dict(own.get("codebook0") or {}),
            mos=own.get("mos"), first_divergence_s=finite_or_none(own.get("first_divergence_s")),
            first_diff_frame_s=finite_or_none(own.get("first_diff_frame_s")),
            audible_from_s=finite_or_none(own.get("audible_from_s")),
            audible_threshold_db=finite_or_none(own.get("audible_threshold_db")), extra=extra,
        )


@dataclass
class Summary:
    """A whole run: its metadata (from run.json), every prompt's result and the overall verdict.

    ``reanalysis_of``: set by ``parity compare RUN`` to the run directory it re-analysed."""

    prompts: list[PromptResult]
    passed: bool
    failure: str | None = None
    tolerance: float | None = None
    recipe: dict = field(default_factory=dict)
    sides: dict = field(default_factory=dict)
    command: str = ""
    peak_memory: dict = field(default_factory=dict)
    reanalysis_of: str | None = None
    schema_version: int = SCHEMA_VERSION
    shard: "Shard | None" = None  # set on a --shard K/N run
    merge: "Merge | None" = None  # set on a directory written by parity merge or by --devices
    extra: dict = field(default_factory=dict)  # run.json's other keys (environment, model, started, ...)

    @property
    def counts(self) -> dict:
        """``not_run`` counts every prompt without a verdict; ``failed`` (only when there are any)
        those of them that started and whose worker or engine failed."""
        ran = [p for p in self.prompts if p.ran]
        out = {"prompts": len(self.prompts), "ran": len(ran), "passed": sum(p.passed for p in ran),
               "not_run": len(self.prompts) - len(ran)}
        failed = sum(p.status == "failed" for p in self.prompts)
        return {**out, "failed": failed} if failed else out

    def prompt(self, prompt_id: str) -> PromptResult | None:
        return next((p for p in self.prompts if p.id == prompt_id), None)

    def to_json(self) -> dict:
        out = {"schema_version": SCHEMA_VERSION, **self.extra, "command": self.command, "recipe": self.recipe,
               "tolerance": self.tolerance, "sides": self.sides, "failure": self.failure,
               "prompts": [p.to_json() for p in self.prompts], "counts": self.counts, "passed": self.passed,
               "peak_memory": self.peak_memory}
        if self.reanalysis_of is not None:
            out["reanalysis_of"] = self.reanalysis_of
        if self.shard is not None:
            out["shard"] = self.shard.to_json()
        if self.merge is not None:
            out["merge"] = self.merge.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Summary":
        own, extra = _known(cls, d)
        extra.pop("counts", None)  # derived from the prompts
        return cls(
            prompts=[PromptResult.from_json(p) for p in own.get("prompts") or []], passed=bool(own.get("passed")),
            failure=own.get("failure"), tolerance=finite_or_none(own.get("tolerance")), recipe=dict(own.get("recipe") or {}),
            sides=dict(own.get("sides") or {}), command=str(own.get("command") or ""),
            peak_memory=dict(own.get("peak_memory") or {}), reanalysis_of=own.get("reanalysis_of"),
            schema_version=int(own.get("schema_version") or 1), shard=_opt(Shard, own.get("shard")),
            merge=_opt(Merge, own.get("merge")), extra=extra,
        )


@dataclass
class BisectTrait:
    """One trait of the candidate engine in a bisect (``bisect.json`` ``traits``): what it is, the
    directions it can be searched in, how a side realises it, what a configuration with it also
    needs, and whether it is a difference between the two sides here (``active``) or why not."""

    trait: str  # "engine.name", e.g. "faster.decode_mask"
    summary: str
    directions: list[str]  # "reference + trait" and/or "candidate - trait"
    realised_by: str  # "the side's traits list" or "the 'cache' setting"
    requires: list[str] = field(default_factory=list)
    state: str = "active"  # "active" or "inactive: why"

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict) -> "BisectTrait":
        own, _ = _known(cls, d)
        return cls(**own)


@dataclass
class Shard:
    """What a ``--shard K/N`` run records: which slice it ran (``index`` is 1-based) of which
    prompt file (``prompts_digest`` of the whole file's prompts), and every prompt of the file with
    the shard it belongs to (``assignment``: ``{id, text, line, shard}``), so that a merge can name
    the prompts of a shard that never arrived."""

    index: int
    count: int
    prompts_digest: str
    prompts_file: str = ""
    total_prompts: int = 0
    source: str = "--shard"
    weight: int = 0  # UTF-8 bytes of this shard's prompts (the balancing weight)
    assignment: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict) -> "Shard":
        own, _ = _known(cls, d)
        return cls(index=int(own["index"]), count=int(own["count"]), prompts_digest=str(own["prompts_digest"]),
                   prompts_file=str(own.get("prompts_file") or ""), total_prompts=int(own.get("total_prompts") or 0),
                   source=str(own.get("source") or "--shard"), weight=int(own.get("weight") or 0),
                   assignment=[dict(a) for a in own.get("assignment") or []])


@dataclass
class MergePart:
    """One part of a merged run: a shard directory (``kind`` shards) or a worker process
    (``kind`` workers). ``status``: ``merged``, ``missing`` (a shard never given to the merge),
    ``finished``, ``died`` or ``stopped`` (a worker; stopped: the run was interrupted)."""

    index: int
    status: str
    prompts: list[str] = field(default_factory=list)  # ids this part finished
    source: str | None = None  # the shard directory, or the worker's device
    failure: str | None = None
    pid: int | None = None
    in_flight: list[str] = field(default_factory=list)  # prompts a dead worker had not finished (now failed)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict) -> "MergePart":
        own, _ = _known(cls, d)
        return cls(index=int(own["index"]), status=str(own["status"]), prompts=[str(x) for x in own.get("prompts") or []],
                   source=own.get("source"), failure=own.get("failure"), pid=own.get("pid"),
                   in_flight=[str(x) for x in own.get("in_flight") or []])


@dataclass
class Merge:
    """How a run directory was assembled from parts: ``parity merge`` of ``count`` shards, or
    ``--devices`` with ``count`` worker processes sharing one queue."""

    kind: str  # "shards" | "workers"
    count: int
    parts: list[MergePart]
    prompts_digest: str = ""

    @property
    def missing(self) -> list[int]:
        return [p.index for p in self.parts if p.status in ("missing", "died")]

    def to_json(self) -> dict:
        return {"kind": self.kind, "count": self.count, "prompts_digest": self.prompts_digest,
                "missing": self.missing, "parts": [p.to_json() for p in self.parts]}

    @classmethod
    def from_json(cls, d: dict) -> "Merge":
        own, _ = _known(cls, d)
        return cls(kind=str(own["kind"]), count=int(own["count"]), parts=[MergePart.from_json(p) for p in own.get("parts") or []],
                   prompts_digest=str(own.get("prompts_digest") or ""))


@dataclass
class BisectOutcome:
    """One bisect configuration run (over all prompts) and whether it diverges."""

    run: int
    purpose: str  # candidate / alone / search / proof / removed / layers
    factors: list[str]
    side: str
    diverges: bool
    first_divergence: Divergence | None = None  # of the first prompt that diverges
    prompt: str | None = None  # that prompt's id
    first_nonfinite: Point | None = None
    max_rel_l2: float | None = None  # largest finite rel L2 over the prompts
    nonfinite: bool = False  # some point held NaN/inf (the maximum is unbounded)
    seconds: float = 0.0
    layers: str | None = None  # for layer-bisect runs: the layers the culprit was applied to
    hints: list[str] = field(default_factory=list)

    def _max(self) -> str:
        return "inf (NaN/inf)" if self.nonfinite else ("-" if self.max_rel_l2 is None else f"{self.max_rel_l2:.2g}")

    def text(self) -> str:
        """'diverges at talker step 0 layer0 (rel L2 0.012)' or 'parity (max rel L2 3e-4)'."""
        if self.diverges and self.first_divergence:
            d = self.first_divergence
            return f"diverges at {d.where()} (rel L2 {_rel(d)})"
        return f"parity (max rel L2 {self._max()})"

    def short(self) -> str:
        """Table cell: 'diverges: talker 0 layer0, 0.012' / 'parity, max 3e-4' (run number after)."""
        if self.diverges and self.first_divergence:
            d = self.first_divergence
            at = f"{d.step}" + (f".{d.substep}" if d.component == "predictor" else "")
            return f"diverges: {d.component} {at} {d.point}, {_rel(d)} (run {self.run})"
        return f"parity, max {self._max()} (run {self.run})"

    def to_json(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)},
                "first_divergence": self.first_divergence.to_json() if self.first_divergence else None,
                "first_nonfinite": self.first_nonfinite.to_json() if self.first_nonfinite else None}

    @classmethod
    def from_json(cls, d: dict) -> "BisectOutcome":
        own, _ = _known(cls, d)
        own["first_divergence"] = _opt(Divergence, own.get("first_divergence"))
        own["first_nonfinite"] = _opt(Point, own.get("first_nonfinite"))
        if isinstance(own.get("max_rel_l2"), str):  # schema 1: "inf"
            own["max_rel_l2"], own["nonfinite"] = None, True
        return cls(**own)
