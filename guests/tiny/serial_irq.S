/* Prints a line interrupt-driven: IER.THRI on, one byte per IRQ 4 (vector 0x24), HLT
 * between interrupts; exits 0 when the whole line is out. */
#include "tiny.h"
.code64
.globl _start
_start:
    SET_IDT_GATE 0x24, isr_serial
    PIC_INIT 0xef               /* unmask IRQ 4 only */
    mov $0x02, %al              /* IER: transmitter-holding-register-empty interrupt */
    mov $COM1_IER, %dx
    out %al, (%dx)
    sti
1:  hlt
    cmpb $0, done(%rip)
    je 1b
    cli
    EXIT 0

isr_serial:
    push %rax
    push %rdx
    push %rsi
    mov $COM1_IIR, %dx          /* reading IIR acknowledges the THRI condition */
    in (%dx), %al
    mov index(%rip), %rsi
    lea msg(%rip), %rax
    movb (%rax,%rsi), %al
    test %al, %al
    jnz 2f
    movb $1, done(%rip)         /* all sent: THRI off */
    xor %al, %al
    mov $COM1_IER, %dx
    out %al, (%dx)
    jmp 3f
2:  mov $COM1, %dx
    out %al, (%dx)
    incq index(%rip)
3:  mov $0x20, %al              /* EOI to the master PIC */
    out %al, $PIC1_CMD
    pop %rsi
    pop %rdx
    pop %rax
    iretq

msg: .asciz "Interrupt-driven hello\n"
index: .quad 0
done: .byte 0
TINY_RUNTIME
