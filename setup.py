"""Packaging lives in setup.cfg; this file only adds the CUDA extension (see csrc/)."""

from setuptools import setup

setup()
