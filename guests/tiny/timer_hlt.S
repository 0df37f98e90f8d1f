/* HLT woken by the in-kernel PIT: programs channel 0 at 100 Hz, counts 3 ticks on
 * IRQ 0 (vector 0x20) with HLT in between, prints "3 ticks" and exits 0. */
#include "tiny.h"
.code64
.globl _start
_start:
    SET_IDT_GATE 0x20, isr_timer
    PIC_INIT 0xfe               /* unmask IRQ 0 only */
    mov $0x34, %al              /* channel 0, lobyte/hibyte, mode 2 */
    out %al, $0x43
    mov $(11932 & 0xff), %al    /* 1193182 Hz / 11932 = 100 Hz */
    out %al, $0x40
    mov $(11932 >> 8), %al
    out %al, $0x40
    sti
1:  hlt
    cmpq $3, ticks(%rip)
    jb 1b
    cli
    PRINT msg
    EXIT 0
isr_timer:
    incq ticks(%rip)
    push %rax
    mov $0x20, %al
    out %al, $PIC1_CMD
    pop %rax
    iretq
ticks: .quad 0
msg: .asciz "3 ticks\n"
TINY_RUNTIME
