/* Prints a line, then halts with interrupts off forever: only the VMM can end it. */
#include "tiny.h"
.code64
.globl _start
_start:
    PRINT msg
    cli
1:  hlt
    jmp 1b
msg: .asciz "halting\n"
TINY_RUNTIME
