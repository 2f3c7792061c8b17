"""Prompt files -> validated :class:`Prompt` objects (DESIGN section 2, PROMPTS).

Two formats are accepted:

* **Text**: one prompt per line. Blank lines and lines whose first non-blank
  character is ``#`` are skipped. Leading and trailing whitespace (including a
  Windows ``\\r``) is stripped from each prompt. Ids are ``p000``, ``p001``, ...
  in order of the prompts (not of the lines).
* **JSONL**: chosen when the file name ends in ``.jsonl`` (any case) or by an explicit
  ``--format jsonl``; never by content (a text line may start with ``{``). One JSON object per line
  with a required ``text`` and optional ``speaker``, ``language``, ``instruct``,
  ``ref_audio``, ``ref_text`` and ``id``. Blank and ``#`` lines are skipped here
  too. String values are kept verbatim (no stripping inside the JSON).

Decisions (all problems raise :class:`~parity.errors.BadInput` with one line
``FILE:LINE: what; how to fix``):

* The file must be UTF-8; a UTF-8 byte-order mark is accepted and dropped. The
  first undecodable byte is reported with its line and column.
* Lines are split on ``\\n`` only, so line numbers match what editors show;
  other Unicode line separators stay inside the prompt.
* A prompt line longer than ``max_chars`` characters is refused (comment lines
  are not counted).
* Control characters (Unicode category ``Cc``) other than tab are refused in
  every string value: they are never intended in a TTS prompt and usually mean
  a binary or mis-encoded file. Lone surrogates (possible through JSON ``\\ud800``
  escapes) are refused because they cannot be encoded again.
* Optional fields may be ``null`` or ``""``; both mean "not given" (``None``).
  ``text`` must be a string with at least one non-whitespace character.
* An ``id`` must match ``[A-Za-z0-9][A-Za-z0-9._-]*`` and be at most 64
  characters, because ids name output files. Prompts without an id get
  ``pNNN`` from their position; ids must be unique, generated ones included.
* ``ref_text`` without ``ref_audio`` is refused (it would be silently ignored).
  ``ref_audio`` must name an existing regular file (relative to the current directory, as the
  engine opens it); URLs and inline data are passed on unchecked.
* The file must be a regular file or a pipe of at most 16 MiB (``/dev/zero`` is refused).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from parity.errors import BadInput

__all__ = ["Prompt", "load_prompts", "check_prompt_fits", "validate_choices", "ALLOWED_FIELDS"]


@dataclass(frozen=True)
class Prompt:
    """One prompt to synthesize; ``line`` is its 1-based line in the source file."""

    id: str
    text: str
    speaker: str | None = None
    language: str | None = None
    instruct: str | None = None
    ref_audio: str | None = None
    ref_text: str | None = None
    line: int = 0


ALLOWED_FIELDS = ("text", "speaker", "language", "instruct", "ref_audio", "ref_text", "id")
_OPTIONAL_FIELDS = ("speaker", "language", "instruct", "ref_audio", "ref_text")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _show(value: object, limit: int = 60) -> str:
    """A short, single-line, quoted rendering of a user-supplied value for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad(where: str, what: str, fix: str) -> BadInput:
    """Build a one-line BadInput ``WHERE: WHAT; FIX``."""
    message = f"{where}: {what}; {fix}"
    return BadInput("\\n".join(message.splitlines()))


def _bad_char(value: str) -> tuple[int, str] | None:
    """Return (index, description) of the first forbidden character in ``value``, if any."""
    for i, ch in enumerate(value):
        category = unicodedata.category(ch)
        if (category == "Cc" and ch != "\t") or category == "Cs":
            return i, f"U+{ord(ch):04X}"
    return None


def _read_text(path: Path) -> str:
    """Read ``path`` as UTF-8, turning every problem into a BadInput. Only a regular file (or a
    pipe, ``<(...)``) of at most ``limits.PROMPTS_LIMIT`` bytes is read: ``/dev/zero`` is refused."""
    from parity import limits

    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # name too long, NUL in the path, ...
        raise _bad(str(path), f"cannot use this path ({exc})", "check the path") from None
    if not exists:
        raise _bad(str(path), "prompt file not found", "check the path (a .txt or .jsonl file)")
    if is_dir:
        raise _bad(str(path), "is a directory, not a prompt file", "pass a .txt or .jsonl file")
    data = limits.read_bytes(path, "prompt file", limits.PROMPTS_LIMIT, allow_pipe=True)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        byte = data[exc.start]
        raise _bad(f"{path}:{line}", f"not valid UTF-8 (byte 0x{byte:02x} at column {column})",
                   "re-save the file as UTF-8") from None


FORMATS = ("text", "jsonl")


def prompt_format(path: Path, fmt: str | None = None) -> str:
    """``text`` or ``jsonl``: ``fmt`` when given, else by extension (``.jsonl`` is JSONL, anything
    else is text). The content never decides: a text line that starts with ``{`` is a prompt."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise BadInput(f"--format {fmt!r} is not one of {', '.join(FORMATS)}; pass --format text or --format jsonl")
        return fmt
    return "jsonl" if path.suffix.lower() == ".jsonl" else "text"


def check_ref_audio(where: str, value: str) -> None:
    """A ``ref_audio`` that names a local file must exist and be a regular file (URLs and inline
    data are passed on unchecked). Relative paths are taken from the current directory, as the
    engine will open them."""
    from parity import limits

    if "://" in value or value.startswith("data:") or (len(value) > 260 and "/" not in value[:260]):
        return
    try:
        limits.check_readable(value, "ref_audio", limits.AUDIO_LIMIT)
    except BadInput as e:
        raise _bad(where, str(e).split(";")[0], "fix the path (relative paths start at the current directory)") from None


def _prompt_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for each non-blank, non-comment line, trailing whitespace stripped."""
    out = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        out.append((number, line))
    return out


def _check_string(where: str, field: str, value: str) -> None:
    """Refuse control characters and lone surrogates in a string value."""
    found = _bad_char(value)
    if found is not None:
        index, code = found
        raise _bad(where, f"{field} contains control character {code} at position {index + 1}",
                   "remove it (only tab is allowed)")


def _from_json(where: str, line: str) -> dict[str, object]:
    """Parse one JSONL line into a dict, or raise BadInput."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _bad(where, f"malformed JSON ({exc.msg} at column {exc.colno})",
                   'write one JSON object per line, e.g. {"text": "Hello."}') from None
    except (ValueError, RecursionError) as exc:  # huge integers, very deep nesting
        raise _bad(where, f"malformed JSON ({type(exc).__name__})",
                   'write one JSON object per line, e.g. {"text": "Hello."}') from None
    if not isinstance(obj, dict):
        raise _bad(where, f"expected a JSON object, got {type(obj).__name__}",
                   'write one JSON object per line, e.g. {"text": "Hello."}')
    unknown = [key for key in obj if key not in ALLOWED_FIELDS]
    if unknown:
        names = ", ".join(_show(key, 40) for key in unknown)
        raise _bad(where, f"unknown field(s) {names}",
                   f"allowed fields are {', '.join(ALLOWED_FIELDS)}")
    return obj


def _fields_from_json(where: str, obj: dict[str, object]) -> dict[str, str | None]:
    """Type-check the fields of one JSONL object; returns str-or-None values."""
    if "text" not in obj:
        raise _bad(where, 'missing required field "text"', 'add "text": "what to say"')
    fields: dict[str, str | None] = {}
    for key in ALLOWED_FIELDS:
        value = obj.get(key)
        if key == "text" and not isinstance(value, str):
            raise _bad(where, f"text must be a string, got {_json_type(value)}",
                       'write "text": "what to say"')
        if key != "text" and value is not None and not isinstance(value, str):
            raise _bad(where, f"{key} must be a string or null, got {_json_type(value)}",
                       f'quote the value, e.g. "{key}": "..."')
        if key != "text" and value == "":
            value = None
        fields[key] = value  # type: ignore[assignment]
    return fields


def _json_type(value: object) -> str:
    """JSON name of a Python value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def load_prompts(path: str | Path, max_chars: int = 2000, fmt: str | None = None) -> list[Prompt]:
    """Load and validate a prompt file (text or JSONL by extension, or ``fmt``; see the module docstring).

    Returns the prompts in file order. Raises :class:`BadInput` (one line with
    file, line number and a fix) for any problem with the file or its contents.
    """
    path = Path(path)
    is_jsonl = prompt_format(path, fmt) == "jsonl"
    lines = _prompt_lines(_read_text(path))
    if not lines:
        raise _bad(str(path), f"no prompts in {path}",
                   "add one prompt per line (blank lines and # comments are skipped)")

    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, line in lines:
        where = f"{path}:{number}"
        if len(line) > max_chars:
            raise _bad(where, f"line is {len(line)} characters, over the limit of {max_chars}",
                       "shorten it or split it into several prompts")
        if is_jsonl:
            fields = _fields_from_json(where, _from_json(where, line))
        else:
            fields = {key: None for key in ALLOWED_FIELDS}
            fields["text"] = line.strip()
        text = fields["text"]
        assert text is not None
        if not text.strip():
            raise _bad(where, "text is empty", "give the prompt some text to say, or remove the line")
        for key in ALLOWED_FIELDS:
            value = fields[key]
            if value is not None:
                _check_string(where, key, value)
        if fields["ref_text"] is not None and fields["ref_audio"] is None:
            raise _bad(where, "ref_text given without ref_audio",
                       'add "ref_audio": "path/to/reference.wav" or drop ref_text')
        if fields["ref_audio"] is not None:
            check_ref_audio(where, fields["ref_audio"])
        prompt_id = fields["id"]
        if prompt_id is None:
            prompt_id = f"p{len(prompts):03d}"
        elif not _ID_RE.fullmatch(prompt_id):
            raise _bad(where, f"bad id {_show(prompt_id)}",
                       "use 1-64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit")
        if prompt_id in seen:
            raise _bad(where, f"duplicate id {_show(prompt_id)} (first used on line {seen[prompt_id]})",
                       "give each prompt a unique id")
        seen[prompt_id] = number
        prompts.append(Prompt(
            id=prompt_id, text=text, speaker=fields["speaker"], language=fields["language"],
            instruct=fields["instruct"], ref_audio=fields["ref_audio"],
            ref_text=fields["ref_text"], line=number,
        ))
    return prompts


def _where(prompt: Prompt, path: str | Path | None) -> str:
    """``FILE:LINE`` (or ``line N``) plus the prompt id, for messages about one prompt."""
    place = f"{path}:{prompt.line}" if path is not None else f"line {prompt.line}"
    return f"{place}: prompt {prompt.id}"


def check_prompt_fits(
    prompts: Iterable[Prompt],
    tokenizer_len: Callable[[str], int],
    max_seq_len: int,
    overhead: int = 32,
    path: str | Path | None = None,
) -> None:
    """Refuse (BadInput) the first prompt whose ``tokenizer_len(text) + overhead > max_seq_len``.

    Meant to run before heavy models load. ``overhead`` covers the chat template and
    special tokens; ``path`` (the prompt file) only improves the message.
    """
    for prompt in prompts:
        n_tokens = tokenizer_len(prompt.text)
        if n_tokens + overhead > max_seq_len:
            raise _bad(
                _where(prompt, path),
                f"text is {n_tokens} tokens + {overhead} overhead = {n_tokens + overhead}, "
                f"over the model's limit of {max_seq_len}",
                "shorten the prompt or split it into several",
            )


def validate_choices(
    prompts: Iterable[Prompt],
    speakers: set[str] | None,
    languages: set[str] | None,
    path: str | Path | None = None,
) -> None:
    """Refuse (BadInput) a prompt whose speaker or language the model does not offer.

    Comparison is case-insensitive. ``None`` for ``speakers``/``languages`` skips that
    check (the model does not say); prompts without a speaker/language are not checked.
    ``path`` (the prompt file) only improves the message.
    """
    checks = (("speaker", speakers), ("language", languages))
    for prompt in prompts:
        for field, allowed in checks:
            value = getattr(prompt, field)
            if allowed is None or value is None:
                continue
            if value.casefold() in {a.casefold() for a in allowed}:
                continue
            if not allowed:
                raise _bad(_where(prompt, path), f"{field} {_show(value)} given but the model has none",
                           f"remove the {field} field")
            raise _bad(_where(prompt, path), f"unknown {field} {_show(value)}",
                       f"available: {', '.join(sorted(allowed, key=str.casefold))}")
