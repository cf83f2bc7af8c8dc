# setuptools cannot express cffi_modules in pyproject.toml; everything else
# lives there.
from setuptools import setup

setup(cffi_modules=["_cffi_src/build_native.py:ffibuilder"])
