"""Bounded, type-checked reads of everything parity reads from a user path or back from a run.

Every input file is checked before it is opened: it must be a regular file (a pipe only where the
caller allows it, e.g. ``--recipe <(...)``) and at most a size limit, so that ``parity run
/dev/zero`` or a FIFO given as a checkpoint is refused at once instead of reading forever or
blocking. Problems are :class:`~parity.errors.BadInput` (exit 2) with one line naming the file.

Model configs are bounded too (:func:`check_model_config`): a ``config.json`` asking for a
million layers is refused before anything is built, even on the meta device.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from parity.errors import BadInput

MiB = 1 << 20
# Size limits per kind of file (bytes). Generous for real use, far below "reads until memory is gone".
PROMPTS_LIMIT = 16 * MiB
RECIPE_LIMIT = 1 * MiB
CONFIG_LIMIT = 16 * MiB  # config.json, generation_config.json, tokenizer configs
RUN_JSON_LIMIT = 64 * MiB  # summary.json, run.json, results/*.json, traces/*.json
POINTS_LIMIT = 512 * MiB  # points/*.csv.gz
CHECKPOINT_LIMIT = 8 * 1024 * MiB  # UTMOS weights
AUDIO_LIMIT = 2 * 1024 * MiB  # a reference clip


def check_readable(path: str | os.PathLike, what: str, limit: int, allow_pipe: bool = False) -> os.stat_result:
    """Refuse ``path`` unless it is a regular file of at most ``limit`` bytes (or, with
    ``allow_pipe``, a pipe). Never opens the file, so a FIFO cannot block here."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{what} '{path}' does not exist; check the path") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{what} '{path}' cannot be used ({getattr(e, 'strerror', None) or e}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{what} '{path}' is a directory, not a file; pass a file")
    if stat.S_ISFIFO(st.st_mode) and allow_pipe:
        return st
    if not stat.S_ISREG(st.st_mode):
        kind = "a pipe" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file"
        raise BadInput(f"{what} '{path}' is {kind}; pass a regular file")
    if st.st_size > limit:
        raise BadInput(f"{what} '{path}' is {st.st_size} bytes, over the limit of {limit}; pass the right file")
    return st


def read_bytes(path: str | os.PathLike, what: str, limit: int, allow_pipe: bool = False) -> bytes:
    """The content of ``path`` after :func:`check_readable`; never more than ``limit`` bytes are
    read (a file that grows, or a pipe that does not end, is refused at the limit)."""
    check_readable(path, what, limit, allow_pipe)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise BadInput(f"{what} '{path}' cannot be read ({e.strerror or e}); check its permissions") from None
    if len(data) > limit:
        raise BadInput(f"{what} '{path}' is over the limit of {limit} bytes; pass the right file")
    return data


def read_text(path: str | os.PathLike, what: str, limit: int, allow_pipe: bool = False) -> str:
    """UTF-8 text of ``path`` (BOM dropped), bounded as :func:`read_bytes`."""
    data = read_bytes(path, what, limit, allow_pipe)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{what} '{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       "re-save it as UTF-8") from None


def parse_json(text: str, what: str, fix: str) -> Any:
    """``json.loads`` whose every failure (syntax, a 5000-digit number, deep nesting, NaN literals
    are allowed as Python does) is one BadInput line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{what} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); {fix}") from None
    except (ValueError, RecursionError) as e:  # int too long to convert, nesting too deep
        raise BadInput(f"{what} is not usable JSON ({type(e).__name__}: {str(e)[:80]}); {fix}") from None


def read_json(path: str | os.PathLike, what: str, limit: int = RUN_JSON_LIMIT, fix: str = "re-run parity") -> Any:
    """Read and parse a JSON file with every check above."""
    return parse_json(read_text(path, what, limit), f"{what} '{path}'", fix)


# --- model configs -------------------------------------------------------------------------------

# Upper bounds of a sane Qwen3-TTS config (the largest public model is far inside them). Checked
# before a model is built on the meta device: building even there is linear in the layer count.
CONFIG_BOUNDS = {
    "num_hidden_layers": 512,
    "hidden_size": 65536,
    "intermediate_size": 1 << 20,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "vocab_size": 1 << 22,
    "text_vocab_size": 1 << 22,
    "text_hidden_size": 65536,
    "num_code_groups": 1024,
    "max_position_embeddings": 1 << 24,
    "codebook_size": 1 << 22,
    "num_quantizers": 1024,
    "latent_dim": 65536,
    "decoder_dim": 65536,
    "codebook_dim": 65536,
    "sliding_window": 1 << 24,
}


def check_model_config(config: Any, where: str) -> None:
    """Refuse a config (any nesting) whose known dimension fields are not integers in
    [0, bound] (see ``CONFIG_BOUNDS``), before anything is allocated."""
    def visit(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{path}.{key}" if path else str(key)
                bound = CONFIG_BOUNDS.get(key)
                if bound is not None and value is not None:
                    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= bound
                    if not ok:
                        raise BadInput(f"{where}: {here} = {_short(value)} is outside 0..{bound}; "
                                       "this is not a real checkpoint's config, fix or re-download it")
                visit(value, here)
        elif isinstance(node, list):
            for i, value in enumerate(node[:10000]):
                visit(value, f"{path}[{i}]")

    visit(config, "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def finite_number(value: Any) -> bool:
    """A JSON number that is a real, finite value (bool excluded)."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False
