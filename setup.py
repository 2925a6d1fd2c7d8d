"""Build hook: the ``lowband`` namespace over the top-level folders, and the native parts.

The folders stay where a newcomer looks for them (``node/``, ``coordinator/``, ``protocols/``,
``sim/``), but they install as ``lowband.node`` and so on: top-level modules named ``node`` or ``sim``
would collide with any other package of those names. The metadata is in pyproject.toml.

Native parts: ``protocols/_fastcodec.c``, the codec's per-hop cast and finite check.
``optional=True`` keeps an install without a C compiler working (``lowband.protocols.codec`` falls back
to torch); CI asserts that it was built (``LOWBAND_REQUIRE_NATIVE=1``).
"""

from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
FOLDERS = ("node", "coordinator", "protocols", "sim")


def packages() -> list[str]:
    """Every folder with an ``__init__.py`` under the four top-level folders, named under ``lowband``."""
    found = []
    for folder in FOLDERS:
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            found.append("lowband." + ".".join(init.parent.relative_to(ROOT).parts))
    return found


setup(
    packages=packages(),
    package_dir={f"lowband.{folder}": folder for folder in FOLDERS},
    package_data={"lowband.protocols": ["*.proto", "*.pyi"], "lowband.coordinator": ["static/*.html"]},
    ext_modules=[Extension("lowband.protocols._fastcodec", ["protocols/_fastcodec.c"], optional=True,
                           extra_compile_args=["-O3"])],
)
