"""The loader's one exception class, below every loader module (each raises it; the
package re-exports it)."""

from vmm.errors import UserError


class LoaderError(UserError):
    """A kernel, initrd or command line pyvmm cannot use; the message is one line."""
