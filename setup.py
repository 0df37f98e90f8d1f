"""Build glue that pyproject.toml cannot express.

- The C run-loop shim (native/) is compiled by cffi at install time.
- The guest sources live at the top of the repository (guests/: kernel config and
  patches, the initramfs /init, the agent, the bare-metal test guests) and ship inside
  the package as ``vmm/guests``, so that a regular (non-editable) install can build and
  boot the default guest; vmm.paths.guests_dir() finds them in either place. Each
  directory of guests/ is listed as a (data-only) package, as setuptools wants.
"""

import os

from setuptools import find_packages, setup

GUEST_PACKAGES = sorted(
    "vmm.guests" + "".join("." + part for part in os.path.relpath(d, "guests").split(os.sep)
                           if part != ".")
    for d, _, _ in os.walk("guests") if "__pycache__" not in d)

setup(
    packages=[*find_packages(include=["vmm", "vmm.*"]), *GUEST_PACKAGES],
    package_dir={"vmm.guests": "guests"},
    package_data={pkg: ["*"] for pkg in GUEST_PACKAGES},
    exclude_package_data={pkg: ["*.pyc", "*.o"] for pkg in GUEST_PACKAGES},
    cffi_modules=["native/build_shim.py:ffibuilder"],
)
