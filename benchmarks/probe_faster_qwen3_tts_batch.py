"""Does faster-qwen3-tts-batch 0.2.0 run on parity's pinned stack (torch 2.11.0, transformers
5.16.1, faster-qwen3-tts 0.5.4)? Each stage of its batched voice-clone path is called the way the
package calls it, on a built-in random base (voice-clone) checkpoint, and the first error of each
stage is recorded with the package line that raised it.

Stages (each independent of the others' outcome):

- ``construct``: ``BatchedFasterQwen3TTS(base, max_batch_size, max_seq_len)`` on a loaded
  faster-qwen3-tts instance. On a CPU its graphs ask CUDA for a device index (no driver: an error,
  recorded); the later CPU stages then build it with the device named ``cpu:0``, which carries an
  index (the same device-only workaround parity's faster engine uses for faster-qwen3-tts).
- ``predictor_cache_init``, ``predictor_masks``: the first two calls of the batched predictor
  graph's ``capture()``.
- ``talker_cache_init``, ``talker_mask``: the batched talker graph's cache set-up (first call of
  its ``capture()``) and the attention-mask call it makes before every decode step (``capture()``
  makes the same call).
- ``batched_prefill``: ``batched_fast_generate`` on four left-padded voice-clone prompts of
  different lengths, up to the copy of the batched prefill's KV cache into the talker graph.
- ``public_path`` (CUDA only): ``generate_voice_clone_batch`` on the same four requests, as a user
  calls it.

It calls the package as published, without the adapters parity's faster-qwen3-tts-batch engine
installs (parity/engines/faster_batch.py), to show why the engine needs them:

    python benchmarks/probe_faster_qwen3_tts_batch.py --out reports/faster_qwen3_tts_batch_probe_cpu.json
    python benchmarks/probe_faster_qwen3_tts_batch.py --device cuda --model random:0.6b-base \\
        --out reports/faster_qwen3_tts_batch_probe_gpu.json       # on a CUDA GPU

Exit status 0 when every stage ran (a CPU's missing CUDA driver aside), 1 when any failed (the JSON says which
and why).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch

TEXTS = ["Hi.", "Hello, this is a quick parity check.", "The quick brown fox jumps over the lazy dog near the riverbank.",
         "Please call Stella and ask her to bring these things with her from the store, and a snack for her brother Bob."]
REF_TEXT = "This is the reference voice."
# In ICL voice cloning the texts are streamed alongside the codes, so the reference clip's codes set
# the prefill length: clips of different lengths give the rows different left padding.
CLIP_SECONDS = [1.0, 1.6, 2.2, 2.8]
PACKAGE = "faster_qwen3_tts_batch"


def versions() -> dict[str, str | None]:
    out = {}
    for dist in ("torch", "transformers", "faster-qwen3-tts", "faster-qwen3-tts-batch", "qwen-tts-hf"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def where(e: BaseException) -> str | None:
    """The deepest frame inside the package ('file:line: code'), else the deepest frame."""
    frames = traceback.extract_tb(e.__traceback__)
    inside = [f for f in frames if f"/{PACKAGE}/" in f.filename] or frames
    if not inside:
        return None
    f = inside[-1]
    return f"{PACKAGE}/{Path(f.filename).name}:{f.lineno}: {(f.line or '').strip()}" if f"/{PACKAGE}/" in f.filename \
        else f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def stage(results: list[dict], name: str, fn) -> object:
    """Run one stage; record ok, or the error and the line that raised it."""
    try:
        value = fn()
    except Exception as e:  # a probe: every failure is the finding
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        results.append({"stage": name, "ok": False, "error": f"{type(e).__name__}: {message}", "at": where(e)})
        print(f"{name}: FAILED  {type(e).__name__}: {message}\n    at {where(e)}")
        return None
    results.append({"stage": name, "ok": True})
    print(f"{name}: ok")
    return value


@contextlib.contextmanager
def device_named(base, name: str):
    """Let the wrapper read ``base.device`` as ``name`` while it builds its graphs."""
    saved = base.device
    base.device = name
    try:
        yield
    finally:
        base.device = saved


def api_checks(results: list[dict]) -> None:
    """The faster-qwen3-tts 0.5.4 calls the package makes, checked by signature (no model needed)."""
    from faster_qwen3_tts import FasterQwen3TTS

    used = {"text", "ref_audio", "ref_text", "language", "xvec_only", "non_streaming_mode", "append_silence"}
    params = set(inspect.signature(FasterQwen3TTS._prepare_generation).parameters)
    missing = sorted(used - params)
    results.append({"stage": "faster_qwen3_tts_api", "ok": not missing and hasattr(FasterQwen3TTS, "_warmup"),
                    "detail": f"_prepare_generation takes {sorted(used)}" + (f"; missing {missing}" if missing else "")
                              + f"; _warmup {'exists' if hasattr(FasterQwen3TTS, '_warmup') else 'missing'}"})
    print(f"faster_qwen3_tts_api: {'ok' if results[-1]['ok'] else 'FAILED'} ({results[-1]['detail']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default="random:tiny-base", help="random:tiny-base (CPU) or random:0.6b-base (GPU), or a directory")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is visible; use --device cpu", file=sys.stderr)
        return 2
    try:
        import faster_qwen3_tts_batch  # noqa: F401
    except ImportError:
        print("faster-qwen3-tts-batch is not installed; pip install -r requirements.lock", file=sys.stderr)
        return 2

    from faster_qwen3_tts_batch import BatchedFasterQwen3TTS
    from faster_qwen3_tts_batch.batched_generate import batched_fast_generate

    from parity.engines.faster import FasterEngine, _cpu_sync_shim
    from parity.models import ensure_builtin
    from parity.prompts import Prompt
    from parity.recipe import Side
    from parity.refclip import write_clip

    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    model_dir = ensure_builtin(args.model.split(":", 1)[1]) if args.model.startswith("random:") else Path(args.model)
    clip_dir = Path(tempfile.mkdtemp(prefix="probe-clips-"))
    clips = [write_clip(clip_dir / f"ref{i}.wav", seconds=CLIP_SECONDS[i % len(CLIP_SECONDS)], seed=1) for i in range(args.batch)]
    results: list[dict] = []
    api_checks(results)

    # faster-qwen3-tts loaded exactly as parity's faster engine loads it (its prompt builder is reused).
    engine = FasterEngine(Side(engine="faster", dtype=dtype, cache=f"static:{args.max_seq_len}", device=args.device),
                          model_dir, allow_cpu=args.device == "cpu", cuda_graphs=False, record=False)
    engine.load()
    base = engine.tts
    batched = stage(results, "construct", lambda: BatchedFasterQwen3TTS(base, max_batch_size=args.batch, max_seq_len=args.max_seq_len))
    if batched is None and args.device == "cpu":
        with device_named(base, "cpu:0"):
            batched = BatchedFasterQwen3TTS(base, max_batch_size=args.batch, max_seq_len=args.max_seq_len)
    pg, tg = batched.batched_predictor_graph, batched.batched_talker_graph

    stage(results, "predictor_cache_init", pg._init_cache_layers)
    stage(results, "predictor_masks", pg._build_attention_masks)
    stage(results, "talker_cache_init", tg._init_cache_layers)
    tg._attention_mask_2d.fill_(1)
    tg.cache_position[0] = 16
    stage(results, "talker_mask", tg._compute_and_set_mask)  # the package's per-decode-step mask call

    prompts = [Prompt(id=f"r{i}", text=t, language="english", ref_audio=str(clips[i]), ref_text=REF_TEXT, line=i + 1)
               for i, t in enumerate(TEXTS[: args.batch])]
    prepared = [engine._prepare(p) for p in prompts]
    _, talker, config, _, _, _, tpe = prepared[0]
    lengths = [int(p[3].shape[1]) for p in prepared]
    print(f"prefill lengths: {lengths}")

    def prefill():
        with _cpu_sync_shim(engine.device), torch.inference_mode():
            return batched_fast_generate(
                talker=talker, talker_input_embeds_list=[p[3] for p in prepared], attention_mask_list=[p[4] for p in prepared],
                trailing_text_hiddens_list=[p[5] for p in prepared], tts_pad_embed=tpe, config=config,
                predictor_graph=pg, talker_graph=tg, max_new_tokens=4, do_sample=False, repetition_penalty=1.0)

    stage(results, "batched_prefill", prefill)

    if args.device == "cuda":
        fresh = BatchedFasterQwen3TTS(base, max_batch_size=args.batch, max_seq_len=args.max_seq_len)
        requests = [{"text": p.text, "language": "english", "ref_audio": p.ref_audio, "ref_text": p.ref_text} for p in prompts]
        stage(results, "public_path", lambda: fresh.generate_voice_clone_batch(requests, max_new_tokens=8, do_sample=False,
                                                                                xvec_only=False))
    engine.close()

    failed = [r for r in results if not r["ok"]]
    # On a CPU the constructor's CUDA device query fails by design of the package (it is a GPU engine);
    # every other failure is the stack's and happens on any device.
    for r in failed:
        r["cause"] = "device (CUDA hard-coded)" if r["stage"] == "construct" and args.device == "cpu" else "stack"
    stack_failed = [r for r in failed if r["cause"] == "stack"]
    report = {
        "question": "does faster-qwen3-tts-batch 0.2.0 run on the pinned stack?",
        "runs": not stack_failed, "device": args.device, "model": args.model, "dtype": dtype, "batch": args.batch,
        "prefill_lengths": lengths, "versions": versions(), "stages": results,
        "failed": [r["stage"] for r in failed], "failed_on_the_stack": [r["stage"] for r in stack_failed],
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"runs on this stack: {'yes' if not stack_failed else 'no'} ({len(stack_failed)} of {len(results)} stages failed on "
          f"the stack, {len(failed) - len(stack_failed)} on the device); wrote {args.out}")
    return 0 if not stack_failed else 1


if __name__ == "__main__":
    sys.exit(main())
