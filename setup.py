"""Build hook for the one native part: the CPU checksum kernel (see
engine_image/kvcache_engine/core/_wordsums.c). Everything else is configured in pyproject.toml.

The extension is optional: where no C compiler is present the build goes on without it, and
kvcache_engine computes the same checksums with torch, about 3x slower (puts, loads and
validation checksum every block). ``KVCACHE_BUILD_NATIVE=0`` skips it (the operator image,
which never checksums blocks)."""

import os

from setuptools import Extension, setup

native = [
    Extension(
        "kvcache_engine.core._wordsums",
        sources=["engine_image/kvcache_engine/core/_wordsums.c"],
        extra_compile_args=["-O3", "-std=c11"],
        optional=True,
    )
]

setup(ext_modules=[] if os.environ.get("KVCACHE_BUILD_NATIVE") == "0" else native)
