/* Prints a line, then executes ud2 with an empty IDT: #UD -> #DF -> triple fault. */
#include "tiny.h"
.code64
.globl _start
_start:
    PRINT msg
    ud2
    EXIT 1
msg: .asciz "about to triple fault\n"
TINY_RUNTIME
