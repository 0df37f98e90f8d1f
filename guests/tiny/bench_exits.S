/* Benchmark guest: COUNT one-byte writes to the UART data register in a tight ring-0
 * loop (each one a port-I/O exit), then the debug-exit port. COUNT is set at build time. */
#include "tiny.h"
#ifndef COUNT
#define COUNT 100000
#endif
.code64
.globl _start
_start:
    mov $COUNT, %rcx
    mov $COM1, %dx
    mov $'.', %al
1:  out %al, (%dx)
    dec %rcx
    jnz 1b
    EXIT 0
TINY_RUNTIME
