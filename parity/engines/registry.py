"""The engine registry: engine names a recipe may use, and the classes behind them.

Built-in engines are lazy ``"module:Class"`` entries below (nothing is imported until a side
uses the engine: the faster engine needs CUDA, the reference engine imports ``qwen_tts``).
Another package adds an engine without editing parity by declaring an entry point in the
``parity.engines`` group, e.g. in its ``pyproject.toml``::

    [project.entry-points."parity.engines"]
    my-engine = "my_package.parity_engine:MyEngine"

A built-in name cannot be taken over by an entry point (the entry point is listed as shadowed).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from parity.errors import BadInput

if TYPE_CHECKING:
    from parity.engines.base import Engine

ENTRY_POINT_GROUP = "parity.engines"

# name -> "module:Class". A new built-in engine is one file plus one line here.
BUILTIN_ENGINES: dict[str, str] = {
    "reference": "parity.engines.reference:ReferenceEngine",
    "faster": "parity.engines.faster:FasterEngine",
    "faster-qwen3-tts-batch": "parity.engines.faster_batch:FasterBatchEngine",
    "example-perturbed": "parity.engines.example_perturbed:PerturbedEngine",
}


@dataclass(frozen=True)
class EngineEntry:
    """One registered engine: its name, where its class lives and who registered it."""

    name: str
    target: str  # "module:Class"
    source: str  # "built-in" or "entry point (distribution name)"
    shadowed: bool = False  # an entry point whose name a built-in already holds (never used)


def entries() -> list[EngineEntry]:
    """Every registered engine, built-ins first, then entry points sorted by name."""
    found = [EngineEntry(name, target, "built-in") for name, target in BUILTIN_ENGINES.items()]
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        source = f"entry point ({dist.name})" if dist is not None else "entry point"
        found.append(EngineEntry(ep.name, ep.value, source, shadowed=ep.name in BUILTIN_ENGINES))
    return found


def available() -> dict[str, EngineEntry]:
    """Usable engines by name (shadowed entry points left out)."""
    out: dict[str, EngineEntry] = {}
    for entry in entries():
        if not entry.shadowed and entry.name not in out:
            out[entry.name] = entry
    return out


def check_name(name: str, where: str = "") -> None:
    """Refuse an engine name nobody registered, listing the ones that exist (no import)."""
    names = available()
    if name not in names:
        prefix = f"{where}: " if where else ""
        raise BadInput(f"{prefix}unknown engine {name!r}; available: {', '.join(names)} "
                       f"(other engines register through the '{ENTRY_POINT_GROUP}' entry-point group)")


def engine_class(name: str) -> type[Engine]:
    """Import and return the class registered as ``name``.

    An unknown name is BadInput; an engine whose module does not import (a missing dependency)
    is BadInput too, naming the module, since that is an installation problem.
    """
    from parity.engines.base import Engine

    check_name(name)
    entry = available()[name]
    module_name, _, attr = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr) if attr else None
    except ImportError as e:
        raise BadInput(f"engine {name!r} is not available: its module {module_name!r} does not import "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); install what it needs or pick another engine") from None
    except AttributeError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise BadInput(f"engine {name!r} from {entry.source} points at {entry.target!r}, which is not a "
                       "parity.engines.base.Engine subclass; fix the registration")
    return cls


# Built-in engines that need a CUDA GPU unless their side says device = "cpu" (they then drive
# their modules eagerly, without CUDA graphs).
CUDA_BUILTINS = ("faster", "faster-qwen3-tts-batch")

# Built-in engines that decode several prompts as one batch (they have ``run_batch``; side setting batch = N).
BATCHING_BUILTINS = ("reference", "faster-qwen3-tts-batch")


def decodes_batches(name: str) -> bool:
    """Whether engine ``name`` can decode a batch of prompts (``batch = N``). Built-ins answer
    without importing anything; another engine does when its class has ``run_batch``."""
    if name in BUILTIN_ENGINES:
        return name in BATCHING_BUILTINS
    return hasattr(engine_class(name), "run_batch")


def variant_family(name: str) -> str:
    """Which engine's variant set applies to engine ``name`` (a wrapper of the reference engine
    takes the reference's variants). Built-ins answer without importing anything."""
    if name in ("reference", "faster"):
        return name
    return engine_class(name).variant_family
