"""The hand-written stub of vubackend._native._atomics matches the compiled lib.

The stub (stubs/vubackend/_native/_atomics.pyi) is what mypy believes; the
compiled module is what runs. This test parses the stub with ``ast`` and
compares it with ``dir(lib)`` and with the C signature cffi reports for each
function: same names, same arity, pointers as ``FFI.CData``, integers as
``int``, ``void`` as ``None``, every parameter positional-only.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Final

import pytest

from vubackend._native import _atomics

STUB = Path(__file__).resolve().parents[2] / "stubs/vubackend/_native/_atomics.pyi"


def _stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text(encoding="utf-8"), filename=str(STUB))


def _lib_class() -> ast.ClassDef:
    for node in _stub_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "_Lib":
            return node
    raise AssertionError(f"no class _Lib in {STUB}")


def _stub_functions() -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in _lib_class().body if isinstance(n, ast.FunctionDef)}


def _stub_attributes() -> dict[str, str]:
    out: dict[str, str] = {}
    for n in _lib_class().body:
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            out[n.target.id] = ast.unparse(n.annotation)
    return out


def _lib_names() -> set[str]:
    return {n for n in dir(_atomics.lib) if not n.startswith("__")}


def test_stub_lib_members_equal_dir_lib() -> None:
    stub_names = set(_stub_functions()) | set(_stub_attributes())
    assert stub_names == _lib_names()


def test_stub_module_exports_ffi_and_lib() -> None:
    public: dict[str, str] = {}
    for node in _stub_tree().body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            public[node.target.id] = ast.unparse(node.annotation)
    assert public == {"ffi": "FFI", "lib": "_Lib"}
    assert {n for n in dir(_atomics) if not n.startswith("_")} == {"ffi", "lib"}


def test_stub_constants_are_ints() -> None:
    attrs = _stub_attributes()
    assert "VU_NATIVE_ABI" in attrs
    assert set(attrs.values()) == {"int"}
    for name in attrs:
        assert type(getattr(_atomics.lib, name)) is int


# Parameters the C functions declare `const uint8_t *`.
_BYTE_SOURCES: Final = frozenset({"src", "prefix", "blob"})


def _annotation_for(ctype_kind: str, cname: str) -> str:
    if ctype_kind == "pointer":
        return "FFI.CData"
    if ctype_kind == "void":
        return "None"
    assert ctype_kind == "primitive", (ctype_kind, cname)
    return "int"


@pytest.mark.parametrize("name", sorted(_stub_functions()))
def test_stub_signature_matches_c(name: str) -> None:
    fn = _stub_functions()[name]
    ctype = _atomics.ffi.typeof(getattr(_atomics.lib, name))
    assert ctype.kind == "function"
    assert not ctype.ellipsis
    args = fn.args
    # (self, <C parameters>, /): everything positional-only, nothing else.
    assert [a.arg for a in args.posonlyargs[:1]] == ["self"]
    assert args.args == []
    assert args.vararg is None
    assert args.kwarg is None
    assert args.kwonlyargs == []
    params = args.posonlyargs[1:]
    assert len(params) == len(ctype.args), "arity differs from the C declaration"
    for param, carg in zip(params, ctype.args, strict=True):
        assert param.annotation is not None
        expected = {_annotation_for(carg.kind, carg.cname)}
        if param.arg in _BYTE_SOURCES and carg.cname == "uint8_t *":
            # A byte source C only reads (declared const): cffi also passes a
            # bytes object as it is.
            expected.add("FFI.CData | bytes")
        assert ast.unparse(param.annotation) in expected
    assert fn.returns is not None
    assert ast.unparse(fn.returns) == _annotation_for(
        ctype.result.kind, ctype.result.cname
    )
