/* Counts to COUNT, waiting for a PIT tick (IRQ 0, 100 Hz) after every STEP counts and
 * printing a '.' there; a guest to snapshot mid-run (tests/vmm/test_cpustate.py).
 *
 * The count lives in r12 and, after each step, in `counter`; r13 sums 1 + 2 + ... so
 * far. Both words sit at fixed addresses the host reads (the image starts at 1 MiB):
 *   0x100008  counter  the count so far
 *   0x100010  starts   how often _start ran (1, unless the guest restarted)
 * Prints "start\n" once, COUNT / STEP dots, then "done\n" and exits with status
 * 0: all well; 1: r12 != counter or != COUNT; 2: r13 != COUNT * (COUNT + 1) / 2;
 * 3: _start ran more than once. */
#include "tiny.h"
#ifndef COUNT
#define COUNT 3000
#endif
#ifndef STEP
#define STEP 50
#endif
.code64
.globl _start
_start:
    jmp 1f
.balign 8
counter: .quad 0        /* 0x100008 */
starts:  .quad 0        /* 0x100010 */
1:  incq starts(%rip)
    PRINT banner
    SET_IDT_GATE 0x20, isr_timer
    PIC_INIT 0xfe               /* unmask IRQ 0 only */
    mov $0x34, %al              /* channel 0, lobyte/hibyte, mode 2 */
    out %al, $0x43
    mov $(11932 & 0xff), %al    /* 1193182 Hz / 11932 = 100 Hz */
    out %al, $0x40
    mov $(11932 >> 8), %al
    out %al, $0x40
    xor %r12d, %r12d
    xor %r13d, %r13d
    mov $STEP, %r14d
    sti
2:  inc %r12
    add %r12, %r13
    mov %r12, counter(%rip)
    dec %r14
    jnz 3f
    mov $STEP, %r14d
    hlt                         /* the next tick */
    PRINT dot
3:  cmp $COUNT, %r12
    jb 2b
    cli
    PRINT done
    cmp counter(%rip), %r12
    jne 4f
    cmp $COUNT, %r12
    jne 4f
    mov $(COUNT * (COUNT + 1) / 2), %rax
    cmp %rax, %r13
    jne 5f
    cmpq $1, starts(%rip)
    jne 6f
    EXIT 0
4:  EXIT 1
5:  EXIT 2
6:  EXIT 3
isr_timer:
    push %rax
    mov $0x20, %al              /* EOI */
    out %al, $PIC1_CMD
    pop %rax
    iretq
banner: .asciz "start\n"
dot:    .asciz "."
done:   .asciz "done\n"
TINY_RUNTIME
