/* Executes popcnt at ring 0: an instruction KVM's emulator cannot execute on
 * emulation-only hosts (the VMM must stop with a diagnostic); elsewhere it just runs. */
#include "tiny.h"
.code64
.globl _start
_start:
    mov $0xff, %rax
    popcnt %rax, %rbx
    cmp $8, %rbx
    jne 1f
    PRINT msg
    EXIT 0
1:  EXIT 31
msg: .asciz "popcnt ran\n"
TINY_RUNTIME
