"""Build the optional C extension with the scan kernels (everything else is in pyproject.toml).

``optional=True``: if no C compiler is available the install still succeeds and lookalike falls
back to numpy for scanning, with a warning.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lookalike.engine._kernels",
            ["src/lookalike/engine/_kernels.c"],
            extra_compile_args=["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
