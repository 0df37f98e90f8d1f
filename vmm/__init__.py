"""pyvmm: a hackable virtual machine monitor in Python on Linux KVM."""

__version__ = "0.1.0"

#: Names exported lazily (module __getattr__, PEP 562), so `import vmm` stays cheap.
_LAZY = {"Guest": "vmm.guest", "RunResult": "vmm.guest", "GuestError": "vmm.guest",
         "GuestTimeout": "vmm.guest"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vmm' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
