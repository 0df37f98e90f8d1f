/* Executes int3 (handled by its own #BP handler, vector 3) and fwait, then exits 0.
 * On emulation-only KVM hosts both need the VMM's quirk completion (docs/emulation-only-hosts.md). */
#include "tiny.h"
.code64
.globl _start
_start:
    SET_IDT_GATE 3, isr_bp
    int3
    cmpq $1, hits(%rip)
    je 1f
    EXIT 30
1:  fwait
    PRINT msg
    EXIT 0
isr_bp:
    incq hits(%rip)
    iretq
hits: .quad 0
msg: .asciz "breakpoint handled\n"
TINY_RUNTIME
