"""Build hook for the optional native parts; the metadata is in pyproject.toml.

- ``protocols/_fastcodec.c``: the codec's per-hop cast and finite check.
- ``node/_fastwire.c``: the activation wire's reply wait (POSIX sockets).

``optional=True``: without a C compiler the install still succeeds; protocols.codec falls back to torch and
node.wire awaits replies on the event loop.
"""

import os

from setuptools import Extension, setup

extensions = [Extension("protocols._fastcodec", ["protocols/_fastcodec.c"], optional=True, extra_compile_args=["-O3"])]
if os.name == "posix":
    extensions.append(Extension("node._fastwire", ["node/_fastwire.c"], optional=True, extra_compile_args=["-O2"]))

setup(ext_modules=extensions)
