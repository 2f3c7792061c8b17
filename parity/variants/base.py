"""The pieces every divergence-source variant is built from.

A *variant* is one numeric setting that makes an engine compute differently from the reference:
RMSNorm variance in bf16, fused QKV, an fp8 KV cache, ... It is written as a spec string::

    NAME[=ARG][@COMPONENT[:LAYERS]]      e.g.  rmsnorm_lowp@talker:0-4   kv_quant=fp8   mask_row=2@talker:1

``COMPONENT`` is ``talker`` or ``predictor`` (default: both); ``LAYERS`` is one decoder layer
``N`` or an inclusive range ``A-B`` (default: all layers, and then also the component's final norm
and rotary embedding). A variant is applied to a *loaded* model (the qwen_tts talker module, which
both engines hold) and records how to restore it in an :class:`Applied`; nothing is reloaded.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from parity.errors import BadInput

COMPONENTS = ("talker", "predictor")
_SPEC = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)(?:=(?P<arg>[A-Za-z0-9_.:+-]+))?(?:@(?P<component>[a-z]+)(?::(?P<layers>[0-9]+(?:-[0-9]+)?))?)?$")


@dataclass(frozen=True)
class Scope:
    """Where a variant applies: a component (None = both) and a half-open layer range (None = all)."""

    component: str | None = None
    layers: tuple[int, int] | None = None  # [start, stop)

    def covers(self, component: str) -> bool:
        return self.component in (None, component)

    def overlaps(self, other: "Scope") -> bool:
        """True when both scopes include some layer (or non-layer part) of the same component."""
        if self.component is not None and other.component is not None and self.component != other.component:
            return False
        if self.layers is None or other.layers is None:
            return True
        return self.layers[0] < other.layers[1] and other.layers[0] < self.layers[1]

    def text(self) -> str:
        if self.component is None:
            return ""
        if self.layers is None:
            return f"@{self.component}"
        a, b = self.layers
        return f"@{self.component}:{a}" if b == a + 1 else f"@{self.component}:{a}-{b - 1}"


@dataclass(frozen=True)
class Spec:
    """A parsed variant spec (see the module docstring for the syntax)."""

    name: str
    arg: str | None = None
    scope: Scope = field(default_factory=Scope)

    def __str__(self) -> str:
        return self.name + (f"={self.arg}" if self.arg is not None else "") + self.scope.text()

    def with_layers(self, component: str, start: int, stop: int) -> "Spec":
        """The same variant restricted to ``component`` layers [start, stop)."""
        return Spec(self.name, self.arg, Scope(component, (start, stop)))


def parse_spec(text: str) -> Spec:
    """Parse ``NAME[=ARG][@COMPONENT[:LAYERS]]`` (syntax only; the registry checks the name)."""
    m = _SPEC.match(text.strip())
    if not m:
        raise BadInput(
            f"variant {text!r} is not NAME[=ARG][@talker|predictor[:LAYER or A-B]] (e.g. rmsnorm_lowp@talker:0-4)"
        )
    component, layers = m["component"], m["layers"]
    if component is not None and component not in COMPONENTS:
        raise BadInput(f"variant '{text}': component '{component}' is not one of {', '.join(COMPONENTS)}")
    span = None
    if layers is not None:
        a, _, b = layers.partition("-")
        start, last = int(a), int(b or a)
        if last < start:
            raise BadInput(f"variant '{text}': layer range {layers} is empty (write A-B with A <= B, inclusive)")
        span = (start, last + 1)
    return Spec(m["name"], m["arg"], Scope(component, span))


class Applied:
    """What applying variants changed: a stack of restore steps (run in reverse by :meth:`undo`)
    and ``notes``, measurements a variant takes while it runs (e.g. the KV quantisation SQNR)."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []
        self._notes: dict[str, dict] = {}
        self._refreshers: list[Callable[[], None]] = []
        self.specs: list[Spec] = []

    def note(self, key: str, refresh: Callable[[dict], None] | None = None) -> dict:
        """The notes dict for ``key``; ``refresh(note)`` brings it up to date when notes are read
        (so a variant can keep its counters on the device and sync only then)."""
        note = self._notes.setdefault(key, {})
        if refresh is not None:
            self._refreshers.append(lambda: refresh(note))
        return note

    @property
    def notes(self) -> dict[str, dict]:
        """Measurements the variants took, per spec (e.g. the KV quantisation SQNR)."""
        for refresh in self._refreshers:
            refresh()
        return self._notes

    def add(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def set_attr(self, obj, name: str, value) -> None:
        """``setattr`` that is undone: an instance attribute is deleted again, others restored."""
        had = name in vars(obj) if hasattr(obj, "__dict__") else False
        old = vars(obj).get(name) if had else None
        setattr(obj, name, value)
        self.add(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def hook(self, handle) -> None:
        self.add(handle.remove)

    def undo(self) -> None:
        while self._steps:
            self._steps.pop()()
        self.specs.clear()


class Target:
    """The part of a loaded engine that variants change: a qwen_tts talker
    (``Qwen3TTSTalkerForConditionalGeneration``) and its code predictor. Both the reference and
    the faster engine hold one, so a variant written against this works for both."""

    def __init__(self, talker: torch.nn.Module, engine: str = "reference"):
        self.talker = talker
        self.engine = engine

    def model(self, component: str) -> torch.nn.Module:
        """The component's inner decoder model (``.layers``, ``.norm``, ``.rotary_emb``)."""
        return self.talker.model if component == "talker" else self.talker.code_predictor.model

    def config(self, component: str):
        return self.talker.config if component == "talker" else self.talker.code_predictor.config

    def n_layers(self, component: str) -> int:
        return len(self.model(component).layers)

    def components(self, scope: Scope) -> list[str]:
        return [c for c in COMPONENTS if scope.covers(c)]

    def layer_range(self, component: str, scope: Scope) -> range:
        """The decoder-layer indices of ``component`` the scope selects (checked against the model)."""
        n = self.n_layers(component)
        if scope.layers is None:
            return range(n)
        start, stop = scope.layers
        if stop > n:
            raise BadInput(f"variant scope {scope.text()}: the {component} has {n} layers (0-{n - 1})")
        return range(start, stop)

    def layers(self, scope: Scope) -> Iterator[tuple[str, int, torch.nn.Module]]:
        """(component, index, decoder layer) for every layer the scope selects."""
        for component in self.components(scope):
            stack = self.model(component).layers
            for i in self.layer_range(component, scope):
                yield component, i, stack[i]

    def whole(self, component: str, scope: Scope) -> bool:
        """True when the scope takes the whole component (then its final norm belongs to it too)."""
        return scope.covers(component) and scope.layers is None


class Variant(ABC):
    """One divergence source. Subclasses set the class attributes and implement :meth:`apply`."""

    name: str = "?"
    summary: str = ""
    args: tuple[str, ...] = ()  # allowed ARG values; empty: checked by the subclass, or no ARG if no default
    default_arg: str | None = None
    per_layer: bool = True  # can be restricted to a layer range (so a layer bisect makes sense)
    outside_layers: bool = False  # a whole-component scope also changes parts outside the decoder layers
    engines: tuple[str, ...] = ("reference", "faster")
    needs_layer: bool = False  # the spec must name a component and a layer
    stackable: bool = False  # several specs of this variant may cover the same layers

    def check(self, spec: Spec, engine: str | None = None) -> Spec:
        """Validate a parsed spec for this variant; returns it with the default arg filled in."""
        arg = spec.arg if spec.arg is not None else self.default_arg
        if self.args and not self._arg_ok(arg):
            raise BadInput(f"variant '{spec}': argument '{arg}' is not one of {', '.join(self.args)}")
        if not self.args and spec.arg is not None and self.default_arg is None:
            raise BadInput(f"variant '{spec}': {self.name} takes no argument")
        if spec.scope.layers is not None and not (self.per_layer or self.needs_layer):
            raise BadInput(f"variant '{spec}': {self.name} applies to a whole component, not to a layer range")
        if self.needs_layer and (spec.scope.component is None or spec.scope.layers is None):
            raise BadInput(f"variant '{spec}': {self.name} needs a component and one layer, e.g. {self.name}@talker:1")
        if engine is not None and engine not in self.engines:
            raise BadInput(f"variant '{spec}' applies to the {' and '.join(self.engines)} engine only, not '{engine}'")
        return Spec(spec.name, arg, spec.scope)

    def _arg_ok(self, arg: str | None) -> bool:
        return arg in self.args

    @abstractmethod
    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        """Change the loaded model; register in ``applied`` everything that must be restored."""

    def engine_settings(self, spec: Spec) -> dict:
        """Settings an engine must honour when it loads (e.g. cuda_graphs off); most have none."""
        return {}
