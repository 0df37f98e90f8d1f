/* Shared macros for pyvmm's bare-metal test guests.
 * The VMM starts them in 64-bit long mode at _start (identity-mapped first 4 GiB,
 * CS = 0x10, RSP = 0x8ff0, interrupts off, an empty IDT: any exception triple-faults). */
#define COM1        0x3f8
#define COM1_IER    0x3f9
#define COM1_IIR    0x3fa
#define COM1_LSR    0x3fd
#define LSR_THRE    0x20
#define DEBUG_EXIT  0xf4
#define TESTDEV     0xe0000000
#define PIC1_CMD    0x20
#define PIC1_DATA   0x21
#define PIC2_CMD    0xa0
#define PIC2_DATA   0xa1

/* Stop the VM with status \code (debug-exit port). */
.macro EXIT code
    mov $\code, %al
    out %al, $DEBUG_EXIT
    hlt
.endm

/* Print the NUL-terminated string at \label, polling LSR.THRE before each byte.
 * Clobbers rax, rbx, rdx, rsi. */
.macro PRINT label
    lea \label(%rip), %rsi
    call print_polled
.endm

/* Remap the 8259 pair to vectors 0x20-0x2f and set the master's mask to \mask. */
.macro PIC_INIT mask
    mov $0x11, %al
    out %al, $PIC1_CMD
    out %al, $PIC2_CMD
    mov $0x20, %al
    out %al, $PIC1_DATA
    mov $0x28, %al
    out %al, $PIC2_DATA
    mov $0x04, %al
    out %al, $PIC1_DATA
    mov $0x02, %al
    out %al, $PIC2_DATA
    mov $0x01, %al
    out %al, $PIC1_DATA
    out %al, $PIC2_DATA
    mov $\mask, %al
    out %al, $PIC1_DATA
    mov $0xff, %al
    out %al, $PIC2_DATA
.endm

/* Point IDT vector \vec at \handler (64-bit interrupt gate, CS 0x10) and load the IDT. */
.macro SET_IDT_GATE vec, handler
    lea \handler(%rip), %rax
    lea idt(%rip), %rdi
    add $(\vec * 16), %rdi
    mov %ax, (%rdi)
    movw $0x10, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    lea idt(%rip), %rax
    mov %rax, idtr+2(%rip)
    lidt idtr(%rip)
.endm

/* The shared routines and the IDT storage; include once, at the end of a guest. */
.macro TINY_RUNTIME
print_polled:
1:  lodsb
    test %al, %al
    jz 3f
    mov %al, %bl
    mov $COM1_LSR, %dx
2:  in (%dx), %al
    test $LSR_THRE, %al
    jz 2b
    mov %bl, %al
    mov $COM1, %dx
    out %al, (%dx)
    jmp 1b
3:  ret
.balign 16
idtr:
    .word 256 * 16 - 1
    .quad 0
.balign 16
idt:
    .fill 256 * 16, 1, 0
.endm
