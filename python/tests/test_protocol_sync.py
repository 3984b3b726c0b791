"""The client's protocol types against the Rust worker's source, read as text
(no cargo): worker/src/exec/protocol.rs's `Request` enum and reply structs,
and the error kinds worker/src/exec/driver.rs sends. Each test fails when either side gains, loses or
changes something the other has not."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import pytest

from flotilla import _errors, _protocol

ROOT = Path(__file__).resolve().parents[2]
#: The wire with the trainer: requests, replies, what a restore refusal's kind is.
PROTOCOL_RS = ROOT / "worker" / "src" / "exec" / "protocol.rs"
#: Where the worker refuses requests.
DRIVER_RS = ROOT / "worker" / "src" / "exec" / "driver.rs"
WIRE_RS = ROOT / "shared" / "src" / "wire.rs"

#: Rust reply struct -> its TypedDict.
REPLY_STRUCTS: dict[str, type] = {
    "Okay": _protocol.OkReply,
    "Refusal": _protocol.Refusal,
    "HelloReply": _protocol.HelloReply,
    "RestoredState": _protocol.RestoredState,
    "RestoreReply": _protocol.RestoreReply,
    "StepReply": _protocol.StepReply,
    "SaveBeginReply": _protocol.SaveBeginReply,
}

#: Fields the client sends that the worker does not read (serde ignores
#: unknown fields): the documented hello `pid`.
EXTRA_REQUEST_FIELDS = {"hello": {"pid"}}


def _source(path: Path) -> str:
    """The file without comments (a `//` inside a string is kept)."""
    text = path.read_text()
    return re.sub(r'("(?:[^"\\]|\\.)*")|//[^\n]*', lambda m: m.group(1) or "", text)


def _body(text: str, header: str) -> str:
    """What is between the braces that follow the regex ``header``."""
    m = re.search(header, text)
    assert m, f"{header!r} not found: has the Rust side moved?"
    start = text.index("{", m.end() - 1)
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
    raise AssertionError(f"unbalanced braces after {header!r}")


def _split(text: str) -> list[str]:
    """Splits at the commas outside any brackets; drops empty parts."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "<({[":
            depth += 1
        elif ch in ">)}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _fields(body: str, where: str) -> dict[str, str]:
    """``name: Type`` fields of a struct or struct variant; a serde
    ``rename`` is followed, any other serde attribute fails the test (this
    test would have to learn it)."""
    out = {}
    for part in _split(body):
        attrs = re.findall(r"#\[serde\(([^)]*)\)\]", part)
        part = re.sub(r"#\[[^\]]*\]", "", part).strip()
        m = re.fullmatch(r"(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:\s*(.+)", part, re.S)
        assert m, f"{where}: cannot read the field {part!r}"
        name = m.group(1)
        for attr in attrs:
            rename = re.fullmatch(r'\s*rename\s*=\s*"([^"]+)"\s*', attr)
            assert rename, f"{where}.{name}: serde attribute {attr!r} is unknown to this test"
            name = rename.group(1)
        out[name] = " ".join(m.group(2).split())
    return out


def _aliases(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"\btype\s+(\w+)\s*=\s*([^;]+);", text)}


#: A Rust item's visibility, if any (`pub`, `pub(super)`, ...).
VIS = r"(?:pub(?:\([^)]*\))?\s+)?"

INTS = {"u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize"}


def _rust_type(text: str, aliases: dict[str, str]) -> str:
    """A Rust type in the notation of :func:`_python_type`."""
    text = re.sub(r"&\s*(?:'\w+\s*)?", "", text.strip())  # &'a str -> str
    if text.startswith("(") and text.endswith(")"):
        return "tuple[" + ", ".join(_rust_type(t, aliases) for t in _split(text[1:-1])) + "]"
    m = re.fullmatch(r"(\w+)\s*<(.*)>", text, re.S)
    if m:
        args = [_rust_type(t, aliases) for t in _split(m.group(2)) if not t.startswith("'")]
        outer = {"Option": "Optional", "Vec": "list"}.get(m.group(1))
        assert outer, f"Rust type {text!r} is unknown to this test"
        return f"{outer}[{', '.join(args)}]"
    if text in aliases:
        return _rust_type(aliases[text], aliases)
    if text in INTS:
        return "int"
    if text in REPLY_STRUCTS:
        return REPLY_STRUCTS[text].__name__
    known = {"String": "str", "str": "str", "bool": "bool", "f32": "float", "f64": "float"}
    assert text in known, f"Rust type {text!r} is unknown to this test"
    return known[text]


def _python_type(hint: object) -> str:
    """A type hint in a notation both languages map to: a Literal is the type
    of its values (the wire carries a plain string or bool)."""
    origin = get_origin(hint)
    if origin is Literal:
        (kind,) = {type(v).__name__ for v in _protocol._literal_values(hint)}
        return kind
    if origin is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        assert len(args) == 1 and len(get_args(hint)) == 2, f"unexpected union {hint!r}"
        return f"Optional[{_python_type(args[0])}]"
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_python_type(a) for a in get_args(hint))}]"
    assert isinstance(hint, type), hint
    return hint.__name__


def _python_fields(typed: object) -> dict[str, str]:
    return {name: _python_type(hint) for name, hint in get_type_hints(typed).items()}


# ---- error kinds -------------------------------------------------------------


def _rust_error_kinds() -> tuple[set[str], set[str]]:
    """(every kind the worker sends, those its restore refusals map to)."""
    text = _source(DRIVER_RS)
    # A refusal goes out only through ExecRunner::refuse.
    constructions = re.findall(r"\bRefusal\s*\{", text)  # not the struct: it has <'a>
    assert len(constructions) == 1, (
        "driver.rs builds a Refusal outside refuse(): teach this test where its kind comes from"
    )
    restore = set(re.findall(r'RestoreFailureKind::\w+\s*=>\s*"(\w+)"', _body(_source(PROTOCOL_RS), r"fn refusal_kind\b")))
    variants = set(re.findall(r"^\s*(\w+)\s*,?\s*$", _body(_source(WIRE_RS), r"pub enum RestoreFailureKind\b"), re.M))
    assert {_snake(v) for v in variants} == restore, (
        "refusal_kind in protocol.rs does not name every RestoreFailureKind variant by its snake_case name"
    )
    sent = set()
    for arg in re.findall(r"(?<!fn )\brefuse\(\s*([^,]+),", text):
        arg = arg.strip()
        if re.fullmatch(r'"\w+"', arg):
            sent.add(arg.strip('"'))
        elif arg.startswith("refusal_kind("):
            sent |= restore
        else:
            raise AssertionError(f"driver.rs refuses with the kind {arg!r}: teach this test where it comes from")
    return sent, restore


def test_error_kinds_match_the_worker() -> None:
    sent, restore = _rust_error_kinds()
    python = set(_errors.WORKER_ERROR_KINDS)
    assert python == sent, (
        f"only in Python: {sorted(python - sent)}; only in worker/src/exec/: {sorted(sent - python)}"
    )
    assert set(_errors.RESTORE_REFUSAL_KINDS) == restore
    assert len(_errors.ERROR_KINDS) == len(set(_errors.ERROR_KINDS)), "a kind is written twice"


def test_every_worker_kind_is_documented() -> None:
    doc = (ROOT / "docs" / "TRAINER_PROTOCOL.md").read_text()
    missing = [k for k in _errors.WORKER_ERROR_KINDS if f"`{k}`" not in doc]
    assert not missing, f"docs/TRAINER_PROTOCOL.md does not name the kinds {missing}"


# ---- requests and replies ---------------------------------------------------


def test_requests_match_the_worker() -> None:
    text = _source(PROTOCOL_RS)
    assert re.search(r'#\[serde\(tag\s*=\s*"op",\s*rename_all\s*=\s*"snake_case"\)\]\s*' + VIS + r"enum Request\b", text), (
        "enum Request's serde attributes changed: the requests' op no longer reads as this test expects"
    )
    aliases = _aliases(text)
    rust = {}
    for variant in _split(_body(text, r"\benum Request\b")):
        m = re.fullmatch(r"(\w+)\s*\{(.*)\}", variant, re.S)
        assert m, f"Request variant {variant!r} is not a struct variant"
        fields = _fields(m.group(2), f"Request::{m.group(1)}")
        rust[_snake(m.group(1))] = {k: _rust_type(v, aliases) for k, v in fields.items()}
    python = {}
    for typed in get_args(_protocol.Request):
        fields = _python_fields(typed)
        (op,) = get_args(get_type_hints(typed)["op"])
        assert fields.pop("op") == "str"
        for extra in EXTRA_REQUEST_FIELDS.get(op, ()):
            fields.pop(extra)
        python[op] = fields
    assert python == rust, f"Python {python} != Rust {rust}"
    assert set(get_args(_protocol.Op)) == set(rust) == set(_protocol.REPLY_TYPES)


def test_replies_match_the_worker() -> None:
    text = _source(PROTOCOL_RS)
    aliases = _aliases(text)
    serialized = {
        m.group(2)
        for m in re.finditer(r"#\[derive\(([^)]*)\)\]\s*(?:#\[[^\]]*\]\s*)*" + VIS + r"struct\s+(\w+)", text)
        if "Serialize" in m.group(1)
    }
    assert serialized == set(REPLY_STRUCTS), "protocol.rs's serialized structs and REPLY_STRUCTS differ"
    assert not re.search(r"#\[serde\([^)]*\)\]\s*(?:#\[[^\]]*\]\s*)*" + VIS + r"struct\b", text), (
        "a reply struct has a container serde attribute this test does not read"
    )
    for name, typed in REPLY_STRUCTS.items():
        fields = _fields(_body(text, rf"\bstruct {name}\b"), name)
        rust = {k: _rust_type(v, aliases) for k, v in fields.items()}
        assert _python_fields(typed) == rust, name
    reply_arms = set(get_args(_protocol.Reply))
    assert reply_arms == set(REPLY_STRUCTS.values()) - {_protocol.RestoredState}


# ---- the parsers of this test, on made-up Rust -------------------------------


def test_the_rust_reader() -> None:
    aliases = {"Decl": "(String, Vec<usize>)"}
    assert _rust_type("Option<Vec<Decl>>", aliases) == "Optional[list[tuple[str, list[int]]]]"
    assert _rust_type("&'a str", {}) == "str"
    assert _fields('a: u64,\n#[serde(rename = "b")]\n    c: Option<String>,', "S") == {
        "a": "u64",
        "b": "Option<String>",
    }
    with pytest.raises(AssertionError, match="unknown to this test"):
        _fields("#[serde(skip)] a: u8", "S")
    assert _python_type(Optional[list[tuple[str, int]]]) == "Optional[list[tuple[str, int]]]"
    assert _python_type(_errors.WorkerErrorKind) == "str"


def _mutated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: Path, old: str, new: str) -> None:
    """Points the test at a copy of ``path`` with ``old`` replaced by ``new``."""
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}: update this test"
    copy = tmp_path / path.name
    copy.write_text(text.replace(old, new, 1))
    names = {PROTOCOL_RS: "PROTOCOL_RS", DRIVER_RS: "DRIVER_RS", WIRE_RS: "WIRE_RS"}
    monkeypatch.setattr(sys.modules[__name__], names[path], copy)


@pytest.mark.parametrize("check, path, old, new, error", [
    # the worker refuses with a new kind
    ("kinds", DRIVER_RS, 'self.refuse("io", e.to_string())', 'self.refuse("busy", e.to_string())',
     r"only in worker/src/exec/: \['busy'\]"),
    # ... or with a kind from elsewhere
    ("kinds", DRIVER_RS, 'self.refuse("io", e.to_string())', "self.refuse(e.kind(), e.to_string())",
     "teach this test"),
    # a new restore failure, mapped in refusal_kind
    ("kinds", WIRE_RS, "pub enum RestoreFailureKind {", "pub enum RestoreFailureKind {\n    Expired,",
     r"only in worker/src/exec/: \['expired'\]"),
    # a reply field's type changes
    ("replies", PROTOCOL_RS, "    pub world_size: u32,", "    pub world_size: String,", "HelloReply"),
    # a new request
    ("requests", PROTOCOL_RS, "    Step { step: u64 },", "    Step { step: u64 },\n    Ping {},", "ping"),
])
def test_the_checks_see_a_worker_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check: str, path: Path, old: str, new: str,
    error: str,
) -> None:
    if path == WIRE_RS:  # refusal_kind names the new variant as well
        _mutated(tmp_path, monkeypatch, PROTOCOL_RS, '=> "unavailable",',
                 '=> "unavailable",\n        RestoreFailureKind::Expired => "expired",')
    _mutated(tmp_path, monkeypatch, path, old, new)
    checks = {"kinds": test_error_kinds_match_the_worker, "requests": test_requests_match_the_worker,
              "replies": test_replies_match_the_worker}
    with pytest.raises(AssertionError, match=error):
        checks[check]()


def test_the_kind_check_sees_a_client_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_errors, "WORKER_ERROR_KINDS", (*_errors.WORKER_ERROR_KINDS, "busy"))
    with pytest.raises(AssertionError, match="only in Python: \\['busy'\\]"):
        test_error_kinds_match_the_worker()
