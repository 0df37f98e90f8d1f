/* Prints a line, then pulses the reset line through the i8042 (0xfe to port 0x64),
 * the way Linux reboots with reboot=k. */
#include "tiny.h"
.code64
.globl _start
_start:
    PRINT msg
    mov $0xfe, %al
    out %al, $0x64
    EXIT 1                      /* not reached: the VMM ends the VM on the reset */
msg: .asciz "resetting\n"
TINY_RUNTIME
