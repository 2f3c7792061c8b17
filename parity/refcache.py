"""The reference-trace cache: a reference side's trace and audio per prompt, reused across runs.

An engine developer re-runs parity after every change to their engine; the reference did not
change, so ``parity run`` takes its traces from here instead of running it again.

Entries are content-addressed: the key is the SHA-256 of everything that determines the
reference's output, namely

- the model: a digest of every file of the checkpoint (weights, configs, tokenizer, speech
  tokenizer), not its path or name;
- the reference side: engine (and the class it resolves to), dtype, attention, cache, TF32,
  device (resolved, with the GPU's name) and variants;
- decoding (sampling, seed, max_frames, ...) and the number of audio seeds;
- the prompt's content (text, speaker, language, instruct, reference text, and the reference
  clip's bytes), not its id or line;
- the trace format version, parity's and the numeric stack's versions, and the CPU thread count
  (torch's CPU kernels may sum in another order with another count).

Each entry is a directory ``<root>/<key[:2]>/<key>/`` with the trace (``reference.safetensors`` +
``reference.json``), the waveforms (``audio.safetensors``, float32, exact) and ``manifest.json``,
written last and atomically, holding the SHA-256 of every file. An entry whose manifest is
missing (partial), unreadable, or whose files do not match it (corrupt) is never trusted: it is
removed and the reference runs again. The root is ``$PARITY_CACHE/reference-traces`` (else the
user cache directory); ``parity cache list`` and ``parity cache prune`` manage it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from parity.errors import BadInput
from parity.prompts import Prompt
from parity.recipe import Decoding, Side
from parity.trace import TRACE_FORMAT_VERSION, Trace

CACHE_FORMAT = 1
SUBDIR = "reference-traces"
MANIFEST = "manifest.json"
_KEY_RE = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> Path:
    """Where reference traces are cached: ``$PARITY_CACHE/reference-traces``."""
    from parity.models import cache_root

    return cache_root() / SUBDIR


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


PIECE = 64 << 20  # a checkpoint file is hashed in pieces of this size, side by side


def _piece_sha256(fd: int, start: int, size: int) -> bytes:
    h = hashlib.sha256()
    end = start + size
    while start < end:
        block = os.pread(fd, min(1 << 20, end - start), start)
        if not block:
            break
        h.update(block)  # hashlib and pread release the GIL: pieces hash in parallel
        start += len(block)
    return h.digest()


def file_digest(path: Path) -> str:
    """A checkpoint file's content digest: its SHA-256 when it fits one piece (``PIECE``), else
    the SHA-256 over its pieces' SHA-256s, which are computed on up to 8 cores at once (one
    SHA-256 stream runs at about 1-2 GB/s, and checkpoints are several GB)."""
    size = path.stat().st_size
    if size <= PIECE:
        return file_sha256(path)
    from concurrent.futures import ThreadPoolExecutor

    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            pieces = list(pool.map(lambda start: _piece_sha256(fd, start, PIECE), range(0, size, PIECE)))
    finally:
        os.close(fd)
    return "pieces:" + hashlib.sha256(f"{PIECE}\n".encode() + b"".join(pieces)).hexdigest()


def weights_digest(directory: Path, memo_path: Path | None = None) -> str:
    """SHA-256 over every file of a checkpoint directory (relative path + content digest).

    Hashing a multi-GB checkpoint takes seconds, so each file's digest is remembered in
    ``memo_path`` keyed by (path, size, modification time); a file that changed is hashed again.
    """
    memo: dict[str, str] = {}
    if memo_path is not None:
        try:
            memo = json.loads(memo_path.read_text(encoding="utf-8"))
            assert isinstance(memo, dict)
        except (OSError, ValueError, AssertionError):
            memo = {}
    h = hashlib.sha256()
    changed = False
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        st = path.stat()
        stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|pieces"  # memos of whole-file digests are not reused
        digest = memo.get(stamp)
        if digest is None:
            digest = memo[stamp] = file_digest(path)
            changed = True
        h.update(f"{path.relative_to(directory).as_posix()}\0{digest}\n".encode())
    if memo_path is not None and changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # only a speed-up
    return h.hexdigest()


def _resolved_device(side: Side) -> str:
    device = side.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name()})"
    return device


def _stack() -> dict:
    from parity.env import _version

    return {"parity": _version("parity"), "torch": torch.__version__, "transformers": _version("transformers"),
            "qwen_tts": _version("qwen-tts-hf") or _version("qwen-tts"), "faster_qwen3_tts": _version("faster-qwen3-tts")}


@dataclass
class CachedReference:
    """What a hit gives back: the trace, its audio (one clip per seed) and the engine's settings."""

    trace: Trace
    audio: list[tuple[np.ndarray, int]]
    describe: dict
    key: str


class ReferenceCache:
    """The cache for one run's reference side; keys add the prompt to this run's fixed parts."""

    def __init__(self, root: Path, model_dir: Path, side: Side, decoding: Decoding, seeds: int, engine_target: str):
        self.root = Path(root)
        self.side = side
        self.base = {
            "cache_format": CACHE_FORMAT, "trace_format": TRACE_FORMAT_VERSION,
            "weights": weights_digest(Path(model_dir), self.root / "weights-digests.json"),
            # No traits and layer probes: the key of a side from before those fields existed
            # (entries stay valid); sub-layer probes record more, so they key differently.
            "side": {**{k: v for k, v in asdict(side).items()
                        if not (k == "traits" and not v) and not (k == "probes" and v == "layers")},
                     "variants": list(side.variants), "device": _resolved_device(side)},
            "engine": engine_target, "decoding": asdict(decoding), "seeds": seeds if decoding.do_sample else 1,
            "stack": _stack(), "cpu_threads": torch.get_num_threads(),
        }
        self.hits = 0
        self.misses = 0
        self.refreshed = 0  # prompts run again on --refresh-reference (the cache was not read)
        self.rebuilt: list[str] = []  # keys of corrupt or partial entries found and removed

    def key(self, prompt: Prompt) -> str:
        content = [prompt.text, prompt.speaker, prompt.language, prompt.instruct, prompt.ref_text,
                   _ref_audio_digest(prompt.ref_audio)]
        blob = json.dumps({**self.base, "prompt": content}, sort_keys=True, default=str, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, prompt: Prompt) -> CachedReference | None:
        """The verified entry for ``prompt``, or None (a corrupt or partial entry is removed)."""
        key = self.key(prompt)
        entry = self.entry(key)
        if not entry.exists():
            self.misses += 1
            return None
        manifest = verify(entry)
        if manifest is None or manifest.get("key") != key:
            shutil.rmtree(entry, ignore_errors=True)
            self.rebuilt.append(key)
            self.misses += 1
            return None
        try:
            trace = Trace.load(entry, "reference")
            from safetensors.torch import load_file

            waves = load_file(str(entry / "audio.safetensors"))
        except Exception:  # digests matched but it does not parse: never trust it
            shutil.rmtree(entry, ignore_errors=True)
            self.rebuilt.append(key)
            self.misses += 1
            return None
        audio = [(waves[f"seed{k}"].numpy(), int(manifest["sample_rate"])) for k in range(int(manifest["clips"]))]
        trace.meta["prompt_id"] = prompt.id
        trace.meta["reference_cache"] = {"hit": True, "key": key}
        os.utime(entry / MANIFEST)  # last used, for prune --older-than
        self.hits += 1
        return CachedReference(trace, audio, manifest.get("describe") or {}, key)

    def put(self, prompt: Prompt, trace: Trace, audio: list[tuple[np.ndarray, int]], describe: dict) -> str:
        """Store a freshly run reference (atomically: a killed run leaves no entry, only a
        temporary directory that ``prune`` removes)."""
        from safetensors.torch import save_file

        key = self.key(prompt)
        entry = self.entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.parent / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            trace.save(tmp, "reference")
            save_file({f"seed{k}": torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)) for k, (w, _) in enumerate(audio)},
                      str(tmp / "audio.safetensors"))
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
            manifest = {
                "key": key, "created": time.time(), "files": files, "clips": len(audio),
                "sample_rate": int(audio[0][1]) if audio else 0, "describe": describe,
                "prompt": {"id": prompt.id, "text": prompt.text[:80]}, "side": self.side.label(),
                "weights": self.base["weights"], "frames": trace.n_frames,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a full or read-only cache never fails the run
        return key

    def summary(self) -> dict:
        return {"dir": str(self.root), "hits": self.hits, "misses": self.misses, "refreshed": self.refreshed,
                "rebuilt": len(self.rebuilt)}


def _ref_audio_digest(ref_audio: str | None) -> str | None:
    """A reference clip is keyed by its bytes when it is a readable file, else by its value (URL)."""
    if not ref_audio:
        return None
    path = Path(ref_audio).expanduser()
    try:
        return "sha256:" + file_sha256(path) if path.is_file() else ref_audio
    except OSError:
        return ref_audio


def verify(entry: Path) -> dict | None:
    """An entry's manifest if every file it lists is there with its digest and nothing else is;
    None for a partial or corrupt entry."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict) and files
        present = {p.name for p in entry.iterdir()} - {MANIFEST}
        if present != set(files):
            return None
        for name, digest in files.items():
            if file_sha256(entry / name) != digest:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return None


# -- parity cache list / prune ------------------------------------------------------------------

@dataclass
class EntryInfo:
    """One cache entry as ``parity cache list`` shows it."""

    key: str
    path: Path
    ok: bool
    bytes: int
    last_used: float
    prompt: str
    side: str
    frames: int | None


def entries(root: Path | None = None) -> list[EntryInfo]:
    """Every entry under the cache root (verified), most recently used first."""
    root = root or cache_dir()
    out: list[EntryInfo] = []
    if not root.is_dir():
        return out
    for shard in sorted(root.iterdir()):
        if not shard.is_dir() or len(shard.name) != 2:
            continue
        for entry in sorted(shard.iterdir()):
            if not (entry.is_dir() and _KEY_RE.fullmatch(entry.name)):
                continue
            manifest = verify(entry)
            size = sum(p.stat().st_size for p in entry.iterdir() if p.is_file())
            try:
                used = (entry / MANIFEST).stat().st_mtime
            except OSError:
                used = entry.stat().st_mtime
            out.append(EntryInfo(entry.name, entry, manifest is not None and manifest.get("key") == entry.name, size, used,
                                 ((manifest or {}).get("prompt") or {}).get("text", "?"), (manifest or {}).get("side", "?"),
                                 (manifest or {}).get("frames")))
    return sorted(out, key=lambda e: -e.last_used)


def parse_age(text: str) -> float:
    """'30m', '12h', '7d', '2w' -> seconds; anything else is BadInput."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise BadInput(f"--older-than {text!r} is not an age; write a number and a unit, e.g. 30m, 12h, 7d or 2w")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def prune(older_than_s: float | None, everything: bool, root: Path | None = None, now: float | None = None) -> dict:
    """Remove entries last used more than ``older_than_s`` ago (or all with ``everything``), and
    always corrupt/partial entries and leftover temporary directories. Only cache entries are
    removed: directories named by a 64-hex key (or ``.tmp-<key>-<pid>``) inside two-letter shards."""
    root = root or cache_dir()
    now = time.time() if now is None else now
    removed, freed, kept = 0, 0, 0
    for info in entries(root):
        if everything or not info.ok or (older_than_s is not None and now - info.last_used > older_than_s):
            freed += info.bytes
            shutil.rmtree(info.path, ignore_errors=True)
            removed += 1
        else:
            kept += 1
    if root.is_dir():
        for shard in root.iterdir():
            if shard.is_dir() and len(shard.name) == 2:
                for tmp in shard.glob(".tmp-*"):
                    if tmp.is_dir() and (everything or now - tmp.stat().st_mtime > 3600):
                        shutil.rmtree(tmp, ignore_errors=True)
                if not any(shard.iterdir()):
                    shard.rmdir()
    return {"removed": removed, "kept": kept, "freed_bytes": freed}
