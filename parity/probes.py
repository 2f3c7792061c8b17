"""Probes: forward hooks that record per-layer outputs at every talker step and predictor sub-step.

The decode loop tells the recorder where it is (``recorder.at("talker", step)`` or
``recorder.at("predictor", frame, sub)``); hooks copy the last position of each probed module into
that slot. ``finish`` stacks the slots into tensors and fails loudly if any probed point recorded
nothing, so a missing hook can never pass as an empty trace.

With ``probes = "sublayers"`` the same holds one level down: :class:`SublayerTaps` hooks each op
inside every decoder layer (for both engines; :class:`HostSublayers` copies to the host for the
eager reference, :class:`GraphSublayers` gathers inside faster-qwen3-tts's CUDA graphs).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class ProbeCoverageError(RuntimeError):
    """A probed module recorded nothing (or not at every step) during a run."""


def _last_position(x) -> torch.Tensor:
    t = x[0] if isinstance(x, (tuple, list)) else x
    return t[:, -1].detach().to(dtype=torch.float32, device="cpu", copy=True)  # [batch rows, hidden]


class Recorder:
    """Hooks on a Qwen3-TTS talker (and its code predictor) that fill per-point slots."""

    def __init__(self, talker: torch.nn.Module, sublayers: bool = False):
        self.talker = talker
        self.predictor = talker.code_predictor
        self.n_talker_layers = len(talker.model.layers)
        self.n_pred_layers = len(self.predictor.model.layers)
        self.n_substeps = int(talker.config.num_code_groups) - 1  # predictor sub-steps per frame
        self.context: tuple | None = None
        self.slots: dict[tuple, dict[str, torch.Tensor]] = {}
        self.hits: dict[str, int] = {}
        self._handles: list = []
        # probes = "sublayers": every op inside each decoder layer as well (see HostSublayers)
        self.sublayers = HostSublayers(self) if sublayers else None

    # -- hook management ---------------------------------------------------------------
    def attach(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        self._hook_stack("talker", self.talker.model.layers, [self.talker.codec_head])
        self._hook_stack("predictor", self.predictor.model.layers, list(self.predictor.lm_head))
        if self.sublayers is not None:
            self.sublayers.taps.attach()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.sublayers is not None:
            self.sublayers.taps.detach()

    def _hook_stack(self, component: str, layers, heads) -> None:
        def pre_embed(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._put(component, "embed", hidden)

        self._handles.append(layers[0].register_forward_pre_hook(pre_embed, with_kwargs=True))
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(component, f"layer{i}")))
        for head in heads:
            self._handles.append(head.register_forward_hook(self._make_hook(component, "logits")))

    def _make_hook(self, component: str, point: str):
        def hook(module, args, output):
            self._put(component, point, output)

        return hook

    def _put(self, component: str, point: str, value) -> None:
        if self.context is None or self.context[0] != component:
            return
        key = f"{component}.{point}"
        self.hits[key] = self.hits.get(key, 0) + 1
        self.slots.setdefault(self.context, {})[point] = _last_position(value)

    @contextmanager
    def at(self, component: str, step: int, sub: int = -1) -> Iterator[None]:
        """Attribute everything the hooks see inside the block to (component, step, sub)."""
        previous = self.context
        self.context = (component, step, sub)
        try:
            yield
        finally:
            self.context = previous

    # -- assembling ------------------------------------------------------------------
    def finish(self, n_steps: int, n_frames: int, row: int = 0) -> dict[str, torch.Tensor]:
        """Stack batch row ``row``'s slots into trace tensors; raise ProbeCoverageError on any
        missing point."""
        talker_points = ["embed"] + [f"layer{i}" for i in range(self.n_talker_layers)]
        pred_points = ["embed"] + [f"layer{i}" for i in range(self.n_pred_layers)]
        talker_hidden, talker_logits = [], []
        for s in range(n_steps):
            slot = self._slot(("talker", s, -1), talker_points + ["logits"])
            talker_hidden.append(torch.stack([slot[p][row] for p in talker_points]))
            talker_logits.append(slot["logits"][row])
        pred_hidden, pred_logits = [], []
        for f in range(n_frames):
            rows_h, rows_l = [], []
            for j in range(self.n_substeps):
                slot = self._slot(("predictor", f, j), pred_points + ["logits"])
                rows_h.append(torch.stack([slot[p][row] for p in pred_points]))
                rows_l.append(slot["logits"][row])
            pred_hidden.append(torch.stack(rows_h))
            pred_logits.append(torch.stack(rows_l))
        p = self.predictor
        hp = p.config.hidden_size
        vp = p.config.vocab_size
        sub = self.sublayers.finish(n_steps, n_frames, row) if self.sublayers is not None else {}
        return {**sub,
            "talker_hidden": torch.stack(talker_hidden),
            "talker_logits": torch.stack(talker_logits),
            "pred_hidden": torch.stack(pred_hidden) if pred_hidden else torch.zeros(0, self.n_substeps, len(pred_points), hp),
            "pred_logits": torch.stack(pred_logits) if pred_logits else torch.zeros(0, self.n_substeps, vp),
        }

    def _slot(self, key: tuple, points: list[str]) -> dict[str, torch.Tensor]:
        slot = self.slots.get(key, {})
        missing = [p for p in points if p not in slot]
        if missing:
            component, step, sub = key
            where = f"{component} step {step}" + (f" sub-step {sub}" if sub >= 0 else "")
            raise ProbeCoverageError(
                f"probe coverage: {where} recorded nothing for {', '.join(missing)} "
                f"(hooks fired: {self.hits or 'none'})"
            )
        return slot

    def reset(self) -> None:
        self.slots.clear()
        self.hits.clear()
        self.context = None
        if self.sublayers is not None:
            self.sublayers.taps.hits.clear()


# -- below the layer -----------------------------------------------------------------------------
#
# ``probes = "sublayers"`` also records, inside every decoder layer, each op's output at the last
# position, in data-flow order:
SUBLAYER_POINTS = ("input_norm", "q", "k", "v", "attn", "o_proj", "post_norm", "mlp")
SUBLAYER_MEANING = {
    "input_norm": "input RMSNorm output",
    "q": "q after q_norm and RoPE",
    "k": "k after k_norm and RoPE",
    "v": "v (v_proj output)",
    "attn": "attention output (before o_proj)",
    "o_proj": "o_proj output",
    "post_norm": "post-attention RMSNorm output",
    "mlp": "MLP output",
}


def sublayer_widths(layer) -> list[int]:
    """Width of each of :data:`SUBLAYER_POINTS` for one decoder layer (q/attn: heads x head_dim,
    k/v: kv heads x head_dim, the rest: the hidden size)."""
    attn = layer.self_attn
    hidden = int(attn.o_proj.out_features)
    q, k, v = int(attn.q_proj.out_features), int(attn.k_proj.out_features), int(attn.v_proj.out_features)
    return [hidden, q, k, v, int(attn.o_proj.in_features), hidden, hidden, hidden]


def _rope_module():
    from qwen_tts.core.models import modeling_qwen3_tts

    return modeling_qwen3_tts


class _RopeTap:
    """q and k after RoPE exist only inside the attention's forward, where they are handed to the
    module-level rotary functions (``apply_multimodal_rotary_pos_emb`` in the talker,
    ``apply_rotary_pos_emb`` in the predictor). While any sub-layer probe is attached those
    functions are wrapped once (reference-counted): the wrapper returns the original's outputs
    unchanged (no extra kernel) and hands them to the probe whose decoder layer is running."""

    NAMES = ("apply_multimodal_rotary_pos_emb", "apply_rotary_pos_emb")

    def __init__(self):
        self.users = 0
        self.originals: dict[str, object] = {}
        self.active: list = []  # stack of (probe, component, layer) whose layer is running

    def install(self) -> None:
        if self.users == 0:
            module = _rope_module()
            for name in self.NAMES:
                original = getattr(module, name)
                self.originals[name] = original
                setattr(module, name, self._wrap(original))
        self.users += 1

    def uninstall(self) -> None:
        self.users -= 1
        if self.users == 0:
            module = _rope_module()
            for name, original in self.originals.items():
                setattr(module, name, original)
            self.originals.clear()
            self.active.clear()

    def _wrap(self, original):
        def rope(q, k, *args, **kwargs):
            q_out, k_out = original(q, k, *args, **kwargs)
            if self.active:
                probe, component, layer = self.active[-1]
                probe.note(component, layer, "q", q_out, heads_first=True)
                probe.note(component, layer, "k", k_out, heads_first=True)
            return q_out, k_out

        return rope


ROPE_TAP = _RopeTap()


def _last_row_major(t: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """The last position of every batch row, flattened: [B, T, W] -> [B, W]; a post-RoPE q/k
    [B, heads, T, head_dim] -> [B, heads * head_dim] (a view when the layout allows)."""
    t = t[0] if isinstance(t, (tuple, list)) else t
    if heads_first:
        return t[:, :, -1].reshape(t.shape[0], -1)
    return t[:, -1]


class SublayerTaps:
    """Hooks inside every decoder layer of the talker and the code predictor that hand each op's
    last-position output to ``sink(component, layer, name, value[B, W])``, in
    :data:`SUBLAYER_POINTS` order. The hooks only take views; what the sink does with them (a
    copy to the host, or a reference gathered later inside a CUDA graph) is the engine's."""

    def __init__(self, talker: torch.nn.Module, sink):
        self.stacks = {"talker": talker.model.layers, "predictor": talker.code_predictor.model.layers}
        self.sink = sink
        self.hits: dict[str, int] = {}
        self._handles: list = []

    def widths(self, component: str) -> list[int]:
        return sublayer_widths(self.stacks[component][0])

    def attach(self) -> None:
        """Register the hooks and the RoPE tap (idempotent)."""
        if self._handles:
            return
        ROPE_TAP.install()
        for component, layers in self.stacks.items():
            for i, layer in enumerate(layers):
                self._hook_layer(component, i, layer)

    def detach(self) -> None:
        if not self._handles:
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        ROPE_TAP.uninstall()

    def note(self, component: str, layer: int, name: str, value, heads_first: bool = False) -> None:
        key = f"{component}.layer{layer}.{name}"
        self.hits[key] = self.hits.get(key, 0) + 1
        self.sink(component, layer, name, _last_row_major(value, heads_first))

    def _hook_layer(self, component: str, i: int, layer) -> None:
        attn = layer.self_attn
        add = self._handles.append

        def enter(module, args):
            ROPE_TAP.active.append((self, component, i))

        def leave(module, args, output):
            if ROPE_TAP.active and ROPE_TAP.active[-1][0] is self:
                ROPE_TAP.active.pop()

        def out(name):
            return lambda module, args, output: self.note(component, i, name, output)

        add(layer.register_forward_pre_hook(enter))
        add(layer.input_layernorm.register_forward_hook(out("input_norm")))
        add(attn.v_proj.register_forward_hook(out("v")))
        add(attn.o_proj.register_forward_pre_hook(lambda module, args: self.note(component, i, "attn", args[0])))
        add(attn.o_proj.register_forward_hook(out("o_proj")))
        add(layer.post_attention_layernorm.register_forward_hook(out("post_norm")))
        add(layer.mlp.register_forward_hook(out("mlp")))
        add(layer.register_forward_hook(leave))

    def missing(self) -> list[str]:
        """Points that never fired (a hook that did not run, or a path that bypassed it)."""
        want = [f"{c}.layer{i}.{n}" for c, layers in self.stacks.items() for i in range(len(layers)) for n in SUBLAYER_POINTS]
        return [k for k in want if not self.hits.get(k)]


class HostSublayers:
    """The eager engines' sink: copies each sub-layer point to the host into the recorder's slot
    of the current (component, step, sub-step), as ``layer{i}.{name}``."""

    def __init__(self, recorder: "Recorder"):
        self.recorder = recorder
        self.taps = SublayerTaps(recorder.talker, self._put)

    def _put(self, component: str, layer: int, name: str, value: torch.Tensor) -> None:
        self.recorder._put(component, f"layer{layer}.{name}", value.unsqueeze(1))

    def finish(self, n_steps: int, n_frames: int, row: int) -> dict[str, torch.Tensor]:
        """[S, L, sum(widths)] and [F, substeps, P, sum(widths)] for batch row ``row``."""
        recorder = self.recorder
        missing = self.taps.missing()
        if missing:
            raise ProbeCoverageError(f"sub-layer probes recorded nothing for {', '.join(missing[:6])}"
                                     + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))

        def layers(key: tuple, n_layers: int) -> torch.Tensor:
            names = [f"layer{i}.{n}" for i in range(n_layers) for n in SUBLAYER_POINTS]
            slot = recorder._slot(key, names)
            return torch.stack([torch.cat([slot[f"layer{i}.{n}"][row] for n in SUBLAYER_POINTS]) for i in range(n_layers)])

        talker = torch.stack([layers(("talker", s, -1), recorder.n_talker_layers) for s in range(n_steps)])
        pred = [torch.stack([layers(("predictor", f, j), recorder.n_pred_layers) for j in range(recorder.n_substeps)])
                for f in range(n_frames)]
        width = sum(self.taps.widths("predictor"))
        return {"talker_sub": talker,
                "pred_sub": torch.stack(pred) if pred else torch.zeros(0, recorder.n_substeps, recorder.n_pred_layers, width)}

    def meta(self) -> dict:
        return sublayer_meta(self.taps)


def sublayer_meta(taps: SublayerTaps) -> dict:
    """What a trace's ``meta["sublayers"]`` says: the points and each component's widths."""
    return {"points": list(SUBLAYER_POINTS), "widths": {c: taps.widths(c) for c in taps.stacks}}


class GraphSublayers:
    """The graph engines' sink (faster-qwen3-tts): each hook keeps a view of batch row 0; the last
    talker layer, and the 15th predictor head, gather them with one ``torch.cat(..., out=slot)``
    per graph, so inside a capture the gather is one recorded kernel that every replay reruns.
    The held views keep the captured tensors alive until the gather (as the layer taps do)."""

    def __init__(self, talker: torch.nn.Module, dtype: torch.dtype, device, substeps: int):
        self.taps = SublayerTaps(talker, self._hold)
        self.predictor = talker.code_predictor
        self.substeps = substeps
        self.n = {c: len(layers) for c, layers in self.taps.stacks.items()}
        self.width = {c: sum(self.taps.widths(c)) for c in self.taps.stacks}
        self.talker_slot = torch.zeros(self.n["talker"] * self.width["talker"], dtype=dtype, device=device)
        self.pred_slot = torch.zeros(substeps * self.n["predictor"] * self.width["predictor"], dtype=dtype, device=device)
        self._held: dict[str, list[dict[str, torch.Tensor]]] = {"talker": [], "predictor": []}
        self._handles: list = []

    def attach(self) -> None:
        self.taps.attach()
        self._handles.append(self.taps.stacks["talker"][-1].register_forward_hook(lambda m, a, o: self._gather("talker")))
        last_head = self.predictor.lm_head[self.substeps - 1]
        self._handles.append(last_head.register_forward_hook(lambda m, a, o: self._gather("predictor")))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.taps.detach()

    def _hold(self, component: str, layer: int, name: str, value: torch.Tensor) -> None:
        held = self._held[component]
        if name == "input_norm" or not held:  # each layer call starts with its input norm
            held.append({})
        held[-1][name] = value[0].reshape(-1)

    def _gather(self, component: str) -> None:
        # The ops fire in execution order (v before the RoPE'd q and k); the slot holds them in
        # SUBLAYER_POINTS order. The ordering is Python-side, so a capture records just the cat.
        held = self._held[component]
        slot = self.talker_slot if component == "talker" else self.pred_slot
        expected = self.n[component] * (1 if component == "talker" else self.substeps)
        if len(held) == expected and all(len(call) == len(SUBLAYER_POINTS) for call in held):
            torch.cat([call[n] for call in held for n in SUBLAYER_POINTS], out=slot)
        held.clear()  # a partial set is dropped: the slot is then stale, which the snapshot check reports

    def talker_snapshot(self) -> torch.Tensor:
        return self.talker_slot.view(self.n["talker"], self.width["talker"]).clone()

    def pred_snapshot(self) -> torch.Tensor:
        return self.pred_slot.view(self.substeps, self.n["predictor"], self.width["predictor"]).clone()

    def check_coverage(self) -> None:
        missing = self.taps.missing()
        if missing:
            raise ProbeCoverageError(f"graph sub-layer taps recorded nothing for {', '.join(missing[:6])}"
                                     + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))

    def meta(self) -> dict:
        return sublayer_meta(self.taps)

    def assemble(self, talker: list[torch.Tensor], pred: list[torch.Tensor], n_steps: int, n_frames: int) -> dict[str, torch.Tensor]:
        """The snapshots taken after the prefill and after each replay, as trace fields; a missing
        or stale snapshot (a replay that did not rewrite the slot) is a ProbeCoverageError."""
        if len(talker) != n_steps or len(pred) != n_frames:
            raise ProbeCoverageError(f"sub-layer taps: {len(talker)} talker snapshots for {n_steps} steps, "
                                     f"{len(pred)} predictor snapshots for {n_frames} frames")
        talker_sub = torch.stack(talker).float().cpu()
        pred_sub = torch.stack(pred).float().cpu() if pred else torch.zeros(0, self.substeps, self.n["predictor"], self.width["predictor"])
        check_stale(talker_sub, "talker sub-layer")
        if n_frames:
            check_stale(pred_sub.flatten(0, 1), "predictor sub-layer")
        return {"talker_sub": talker_sub, "pred_sub": pred_sub}


def check_stale(snapshots: torch.Tensor, what: str) -> None:
    """A replay that did not rewrite its slot leaves a snapshot bit-identical to the one before it;
    real decode steps never repeat exactly (the position changes every step)."""
    if snapshots.shape[0] < 2:
        return
    same = (snapshots[1:] == snapshots[:-1]).flatten(1).all(dim=1)
    if bool(same.any()):
        n = int(same.nonzero()[0, 0]) + 1
        raise ProbeCoverageError(f"stale {what} taps: snapshot {n} is identical to snapshot {n - 1} (slots not rewritten by the replay)")
