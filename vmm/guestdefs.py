"""Names the default guest and the VMM agree on: console markers printed by the guest's
/init, kernel command-line parameters it reads, the build recipe's version.

A leaf module (no imports): vmm.defaultguest (start-up) and vmm.guestbuild (the build)
both use it, and neither imports the other's module for them.
"""

#: Printed by /init on the console once the guest's user space is up.
READY_MARKER = "pyvmm: ready"
#: Printed by /init after the ``pyvmm.cmd`` command finished, followed by " <status>".
EXIT_MARKER = "pyvmm: exit"
#: Kernel command-line parameter carrying a base64-encoded shell command for /init.
CMD_PARAM = "pyvmm.cmd"
#: Kernel command-line word that makes /init start the agent on ttyS1 (vmm/guest.py).
AGENT_PARAM = "pyvmm.agent"
#: Kernel command-line word that makes /init start the agent as a daemon before the
#: interactive shell, which waits for the host's INIT (vmm/cli/shellsnap.py).
SHELL_AGENT_PARAM = "pyvmm.shell-agent"
#: Kernel command-line parameter naming the disk the agent chroots commands into.
ROOTFS_PARAM = "pyvmm.rootfs"

#: Bump when the way the guest is built changes (not needed for input edits: those are
#: hashed by vmm.guestbuild). Part of every cache key and of the manifest.
BUILD_RECIPE_VERSION = 1
