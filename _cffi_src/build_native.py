"""Build script for the native helper ``vubackend._native._atomics`` (cffi, API mode).

Rules:

* ``native.h`` is the cdef (declarations only, parsed by cffi) and
  ``native.c`` the C source; this file only reads them and calls
  ``set_source``. Wired into the build by ``setup.py``
  (``cffi_modules=["_cffi_src/build_native.py:ffibuilder"]``).
* The C must compile with no warning under the flags below (gcc 12).
* Build through setuptools only, so that there is one build path and one
  file name (``_atomics.abi3.so``): ``pip install --no-build-isolation
  --no-deps -e .`` puts the extension into ``vubackend/_native/``.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((_HERE / "native.h").read_text(encoding="utf-8"))
ffibuilder.set_source(
    "vubackend._native._atomics",
    (_HERE / "native.c").read_text(encoding="utf-8"),
    extra_compile_args=[
        "-O2",
        "-Wall",
        "-Wextra",
        "-Wconversion",
        "-Werror",
        "-std=c11",
    ],
)
