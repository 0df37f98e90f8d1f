"""The two kinds of error pyvmm reports to a user (each as one line, no traceback).

``UserError``: bad input the user can fix — a missing or malformed file, an unusable
size or option. The CLI exits with status 2.
``HostError``: the host cannot do what was asked — no KVM, a failed guest build. The
CLI exits with status 1.
Each module keeps its own exception class (LoaderError, BlockError, ...), derived from
one of these, so callers can catch precisely or broadly, and the CLI need not import
every module just to know its exceptions.
"""


class UserError(Exception):
    """Bad input from the user (CLI exit status 2)."""


class HostError(Exception):
    """The host or its KVM cannot run the VM (CLI exit status 1)."""
