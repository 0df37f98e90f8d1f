/* Prints a line over the UART, polling the line status register, then exits with
 * EXIT_STATUS (0 unless defined at build time). */
#include "tiny.h"
#ifndef EXIT_STATUS
#define EXIT_STATUS 0
#endif
.code64
.globl _start
_start:
    PRINT msg
    EXIT EXIT_STATUS
msg: .asciz "Hello from a tiny guest\n"
TINY_RUNTIME
