/* Exercises the buses: MMIO reads/writes of the test device, unclaimed port and MMIO
 * reads (all-ones), string port I/O. Exits 0 and prints "devices ok" when every check
 * passes; exits with the number of the failed check otherwise. */
#include "tiny.h"
.code64
.globl _start
_start:
    mov $TESTDEV, %rdi
    mov (%rdi), %eax                    /* 32-bit MMIO read: ID register */
    cmp $0x4d4d5650, %eax
    je 1f
    EXIT 10
1:  mov $0x1122334455667788, %rax       /* 64-bit MMIO write, read back */
    mov %rax, 0x10(%rdi)
    mov 0x10(%rdi), %rbx
    cmp %rax, %rbx
    je 2f
    EXIT 11
2:  movb $0xab, 0x20(%rdi)              /* 8-bit MMIO write, read back */
    movb 0x20(%rdi), %al
    cmp $0xab, %al
    je 3f
    EXIT 12
3:  mov $0x510, %dx                     /* unclaimed port: 8- and 16-bit reads */
    in (%dx), %al
    cmp $0xff, %al
    je 4f
    EXIT 13
4:  in (%dx), %ax
    cmp $0xffff, %ax
    je 5f
    EXIT 14
5:  mov $0xe0001000, %rdi               /* unclaimed MMIO: 32-bit read */
    mov (%rdi), %eax
    cmp $0xffffffff, %eax
    je 6f
    EXIT 15
6:  lea strio(%rip), %rsi               /* string port I/O: rep outsb to the UART */
    mov $(strio_end - strio), %rcx
    mov $COM1, %dx
    cld
    rep outsb
    mov $TESTDEV, %rdi                  /* the test device counted our writes */
    mov 4(%rdi), %eax
    cmp $2, %eax
    je 7f
    EXIT 16
7:  PRINT msg
    EXIT 0
strio: .ascii "string io ok\n"
strio_end:
msg: .asciz "devices ok\n"
TINY_RUNTIME
