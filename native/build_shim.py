"""cffi builder for the run-loop shim (compiled at `pip install` time into vmm._shim)."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
# The declarations Python sees: shim.h without the preprocessor lines.
ffibuilder.cdef("\n".join(
    line for line in (HERE / "shim.h").read_text().splitlines()
    if not line.startswith("#include")).replace("#define SHIM_EXIT_INTR 10", "#define SHIM_EXIT_INTR ..."))
ffibuilder.set_source(
    "vmm._shim",
    '#include "shim.h"',
    # Paths relative to the project root, where setup.py runs the build.
    sources=["native/shim.c"],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-Wall"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
