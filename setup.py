"""Build script.  The package is pure Python until the compiled extension (csrc/) is added; all
metadata lives in pyproject.toml."""

from setuptools import setup

setup()
