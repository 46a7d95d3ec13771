"""Builds monolith-client with its protobuf modules generated first (see gen_protos.py)."""

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_protos import generate  # noqa: E402


class BuildWithProtos(build_py):
    """build_py, after compiling the protos into monolith_client/_proto/."""

    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
