"""Build hook for the optional native codec kernels (protocols/_fastcodec.c); the metadata is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and protocols.codec falls back to torch.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("protocols._fastcodec", ["protocols/_fastcodec.c"], optional=True,
                             extra_compile_args=["-O3"])])
