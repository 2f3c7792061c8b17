"""Tests for parity.prompts: formats, every error case, and property tests."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.errors import BadInput
from parity.prompts import ALLOWED_FIELDS, Prompt, check_prompt_fits, load_prompts, validate_choices

REPO = Path(__file__).resolve().parent.parent
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    """Write ``content`` to ``tmp_path/name`` (UTF-8 for str) and return the path."""
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def bad(path: Path, line: int | None = None, **kwargs: object) -> str:
    """Load ``path`` expecting BadInput; check the message is one line naming file (and line)."""
    with pytest.raises(BadInput) as info:
        load_prompts(path, **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert path.name in message, message
    if line is not None:
        assert f"{path.name}:{line}:" in message, message
    assert info.value.exit_code == 2
    return message


# ----- happy paths -------------------------------------------------------------------


def test_text_format(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "# header\n\n  Hello there.  \r\n   # indented comment\nSecond one.\n\n")
    prompts = load_prompts(path)
    assert prompts == [Prompt(id="p000", text="Hello there.", line=3),
                       Prompt(id="p001", text="Second one.", line=5)]


def test_text_format_keeps_tabs_inside_and_no_final_newline(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "a\tb")
    assert load_prompts(path) == [Prompt(id="p000", text="a\tb", line=1)]


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", b"\xef\xbb\xbfHello\n")
    assert load_prompts(path)[0].text == "Hello"


def test_jsonl_format(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # ref_audio paths start at the current directory
    (tmp_path / "r.wav").write_bytes(b"RIFF")
    rows = [
        {"id": "a", "text": "Hi.", "speaker": "Vivian", "language": "english"},
        {"text": "你好。", "instruct": "calm", "ref_audio": "r.wav", "ref_text": "ref", "speaker": None},
        {"text": "x", "speaker": ""},
    ]
    body = "# comment\n" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    prompts = load_prompts(write(tmp_path, "p.jsonl", body))
    assert prompts == [
        Prompt(id="a", text="Hi.", speaker="Vivian", language="english", line=2),
        Prompt(id="p001", text="你好。", instruct="calm", ref_audio="r.wav", ref_text="ref", line=3),
        Prompt(id="p002", text="x", line=4),
    ]


def test_format_by_extension_or_flag_never_by_content(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", '\n# c\n{"text": "Hi.", "id": "x1"}\n')
    assert load_prompts(path) == [Prompt(id="p000", text='{"text": "Hi.", "id": "x1"}', line=3)]
    assert load_prompts(path, fmt="jsonl") == [Prompt(id="x1", text="Hi.", line=3)]


def test_missing_ref_audio_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", json.dumps({"text": "Hi.", "ref_audio": str(tmp_path / "none.wav")}) + "\n")
    with pytest.raises(BadInput, match=r"p.jsonl:1: ref_audio .* does not exist"):
        load_prompts(path)


def test_jsonl_text_kept_verbatim(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", json.dumps({"text": "  spaced  "}) + "\r\n")
    assert load_prompts(path)[0].text == "  spaced  "


def test_bundled_prompt_files() -> None:
    smoke = load_prompts(REPO / "recipes/prompts/smoke.txt")
    assert len(smoke) == 3 and all(len(p.text) < 60 for p in smoke)
    bench = load_prompts(REPO / "recipes/prompts/en_zh_18.jsonl")
    assert len(bench) == 18
    assert {p.language for p in bench} == {"english", "chinese"}
    validate_choices(bench, {"vivian", "ryan"}, {"english", "chinese"})


# ----- file-level errors ---------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = bad(tmp_path / "nope.txt")
    assert "not found" in message


def test_unusable_path(tmp_path: Path) -> None:
    bad(tmp_path / ("x" * 5000 + ".txt"))


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.txt").mkdir()
    assert "directory" in bad(tmp_path / "dir.txt")


@pytest.mark.parametrize("content", ["", "\n\n", "# only\n  # comments\n\n"])
def test_no_prompts(tmp_path: Path, content: str) -> None:
    message = bad(write(tmp_path, "empty.txt", content))
    assert "no prompts in" in message and "add one prompt per line" in message


def test_empty_jsonl(tmp_path: Path) -> None:
    assert "no prompts in" in bad(write(tmp_path, "empty.jsonl", "# nothing\n"))


def test_not_utf8_reports_line(tmp_path: Path) -> None:
    message = bad(write(tmp_path, "latin.txt", b"ok\n# fine\ncaf\xe9 au lait\n"), line=3)
    assert "UTF-8" in message and "0xe9" in message and "column 4" in message


def test_utf16_file(tmp_path: Path) -> None:
    assert "UTF-8" in bad(write(tmp_path, "u16.txt", "Hello\n".encode("utf-16")), line=1)


def test_line_too_long(tmp_path: Path) -> None:
    path = write(tmp_path, "long.txt", "short\n" + "x" * 51 + "\n")
    message = bad(path, line=2, max_chars=50)
    assert "51" in message and "50" in message
    assert len(load_prompts(write(tmp_path, "ok.txt", "x" * 50), max_chars=50)) == 1


def test_long_comment_is_fine(tmp_path: Path) -> None:
    assert len(load_prompts(write(tmp_path, "c.txt", "#" + "x" * 100 + "\nhi\n"), max_chars=10)) == 1


def test_control_character(tmp_path: Path) -> None:
    message = bad(write(tmp_path, "ctl.txt", "fine\nbad\x00text\n"), line=2)
    assert "U+0000" in message


def test_control_character_in_jsonl_field(tmp_path: Path) -> None:
    path = write(tmp_path, "ctl.jsonl", json.dumps({"text": "ok", "instruct": "a\u0007b"}) + "\n")
    assert "instruct" in bad(path, line=1)


def test_lone_surrogate(tmp_path: Path) -> None:
    assert "U+D800" in bad(write(tmp_path, "s.jsonl", '{"text": "a\\ud800"}\n'), line=1)


# ----- JSONL errors ------------------------------------------------------------------------


def test_malformed_json(tmp_path: Path) -> None:
    path = write(tmp_path, "m.jsonl", '{"text": "ok"}\n\n{"text": "oops"\n')
    assert "malformed JSON" in bad(path, line=3)


def test_deeply_nested_json(tmp_path: Path) -> None:
    bad(write(tmp_path, "deep.jsonl", "[" * 1999 + "\n"), line=1)


def test_not_an_object(tmp_path: Path) -> None:
    assert "object" in bad(write(tmp_path, "arr.jsonl", '["text"]\n'), line=1)


def test_unknown_field(tmp_path: Path) -> None:
    path = write(tmp_path, "u.jsonl", '{"text": "a"}\n{"text": "b", "voice": "x", "spk\\nx": 1}\n')
    message = bad(path, line=2)
    assert "'voice'" in message
    for field in ALLOWED_FIELDS:
        assert field in message


def test_missing_text(tmp_path: Path) -> None:
    assert '"text"' in bad(write(tmp_path, "t.jsonl", '{"speaker": "ryan"}\n'), line=1)


@pytest.mark.parametrize("row, field", [
    ('{"text": 3}', "text"),
    ('{"text": null}', "text"),
    ('{"text": ["a"]}', "text"),
    ('{"text": "a", "id": 7}', "id"),
    ('{"text": "a", "speaker": true}', "speaker"),
    ('{"text": "a", "language": {"x": 1}}', "language"),
])
def test_wrong_types(tmp_path: Path, row: str, field: str) -> None:
    message = bad(write(tmp_path, "w.jsonl", row + "\n"), line=1)
    assert f"{field} must be a string" in message


@pytest.mark.parametrize("row", ['{"text": ""}', '{"text": "   "}'])
def test_empty_text_jsonl(tmp_path: Path, row: str) -> None:
    assert "empty" in bad(write(tmp_path, "e.jsonl", '{"text": "a"}\n' + row + "\n"), line=2)


def test_bad_id(tmp_path: Path) -> None:
    assert "bad id" in bad(write(tmp_path, "i.jsonl", '{"text": "a", "id": "../etc"}\n'), line=1)


def test_duplicate_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", '{"text": "a", "id": "x"}\n# c\n{"text": "b", "id": "x"}\n')
    assert "first used on line 1" in bad(path, line=3)


def test_duplicate_with_generated_id(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", '{"text": "a"}\n{"text": "b", "id": "p000"}\n')
    assert "duplicate id" in bad(path, line=2)


def test_ref_text_without_ref_audio(tmp_path: Path) -> None:
    assert "ref_audio" in bad(write(tmp_path, "r.jsonl", '{"text": "a", "ref_text": "b"}\n'), line=1)


# ----- check_prompt_fits / validate_choices ----------------------------------------------------


def one_line_bad(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    """Call ``fn`` expecting a one-line BadInput; return its message."""
    with pytest.raises(BadInput) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


PROMPTS = [Prompt(id="p000", text="short", speaker="Ryan", language="English", line=2),
           Prompt(id="long1", text="x" * 100, speaker="vivian", language="Chinese", line=5)]


def test_check_prompt_fits() -> None:
    check_prompt_fits(PROMPTS, len, max_seq_len=132)
    message = one_line_bad(check_prompt_fits, PROMPTS, len, max_seq_len=131, path="f.jsonl")
    assert "long1" in message and "f.jsonl:5" in message and "131" in message
    check_prompt_fits(PROMPTS, len, 100, overhead=0)  # exactly at the limit fits
    message = one_line_bad(check_prompt_fits, PROMPTS, len, 99, overhead=0)
    assert "long1" in message and "line 5" in message


def test_validate_choices_ok_case_insensitive() -> None:
    validate_choices(PROMPTS, {"ryan", "VIVIAN"}, {"english", "chinese"})
    validate_choices(PROMPTS, None, None)
    validate_choices([Prompt(id="a", text="t")], set(), set())


def test_validate_choices_unknown_speaker() -> None:
    message = one_line_bad(validate_choices, PROMPTS, {"ryan", "aiden"}, None, path="f.jsonl")
    assert "long1" in message and "f.jsonl:5" in message and "'vivian'" in message
    assert "aiden, ryan" in message


def test_validate_choices_unknown_language() -> None:
    message = one_line_bad(validate_choices, PROMPTS, None, {"english"})
    assert "long1" in message and "line 5" in message and "english" in message


def test_validate_choices_model_without_speakers() -> None:
    message = one_line_bad(validate_choices, PROMPTS, set(), None)
    assert "p000" in message and "remove the speaker" in message


# ----- property tests ----------------------------------------------------------------------


def load_or_bad(path: Path) -> list[Prompt] | None:
    """Load ``path``; BadInput is fine (returns None, checked one-line), anything else fails."""
    try:
        return load_prompts(path)
    except BadInput as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        return None


@FAST
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_arbitrary_bytes(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"f{suffix}"
        path.write_bytes(data)
        load_or_bad(path)


@FAST
@given(text=st.text(max_size=400), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_arbitrary_text(text: str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"f{suffix}"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        prompts = load_or_bad(path)
        for prompt in prompts or []:
            assert prompt.text.strip() and prompt.line >= 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(
    st.sampled_from(ALLOWED_FIELDS) | st.text(max_size=8),
    st.text(max_size=30) | json_values,
    max_size=5,
)


@FAST
@given(rows=st.lists(json_objects, min_size=1, max_size=5), ascii_only=st.booleans())
def test_arbitrary_json_objects(rows: list[dict], ascii_only: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.jsonl"
        body = "\n".join(json.dumps(row, ensure_ascii=ascii_only) for row in rows)
        path.write_bytes(body.encode("utf-8", "surrogatepass"))
        load_or_bad(path)


safe_text = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")) | st.just("\t"), min_size=1, max_size=40,
).filter(lambda s: s.strip())
optional = st.none() | safe_text
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", fullmatch=True)


@st.composite
def prompt_lists(draw: st.DrawFn) -> list[Prompt]:
    """Valid prompts with unique ids and lines 1..n, as load_prompts would return them."""
    n = draw(st.integers(min_value=1, max_value=6))
    unique_ids = draw(st.lists(ids, min_size=n, max_size=n, unique=True))
    prompts = []
    for i, prompt_id in enumerate(unique_ids):
        # Local ref_audio files must exist; URLs and inline data are passed on unchecked.
        ref_audio = draw(st.none() | st.sampled_from(["https://example.com/a.wav", "data:audio/wav;base64,UklGRg=="]))
        prompts.append(Prompt(
            id=prompt_id, text=draw(safe_text), speaker=draw(optional), language=draw(optional),
            instruct=draw(optional), ref_audio=ref_audio,
            ref_text=draw(optional) if ref_audio is not None else None, line=i + 1,
        ))
    return prompts


@FAST
@given(prompts=prompt_lists(), ascii_only=st.booleans())
def test_jsonl_round_trip(prompts: list[Prompt], ascii_only: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rt.jsonl"
        lines = []
        for p in prompts:
            row = {k: getattr(p, k) for k in ALLOWED_FIELDS if getattr(p, k) is not None}
            lines.append(json.dumps(row, ensure_ascii=ascii_only))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert load_prompts(path) == prompts
