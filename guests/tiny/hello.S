/* Prints a line over the UART, polling the line status register, then exits 0. */
#include "tiny.h"
.code64
.globl _start
_start:
    PRINT msg
    EXIT 0
msg: .asciz "Hello from a tiny guest\n"
TINY_RUNTIME
