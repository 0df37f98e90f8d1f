/* SMP bring-up: the BSP wakes CPUS-1 application processors with INIT-SIPI-SIPI; each
 * AP goes real mode -> protected mode -> long mode through a trampoline below 1 MiB,
 * prints "cpu <APIC ID> up" and counts itself in; the BSP waits for all of them, prints
 * "all <CPUS> cpus up" and exits with status 0.
 *
 * Exit statuses: 0 all up; 20 timed out waiting for the APs (TIMEOUT_TSC cycles).
 *
 * Build defines: CPUS (vCPUs in the VM, default 2); TIMEOUT_TSC (the BSP's bounded wait).
 *
 * With ROUNDS > 0 (the SMP snapshot test, tests/vmm/test_snapshot_smp.py) every CPU then
 * works: ROUNDS rounds of STEP loop iterations, each followed by a line "cpu <ID> <k>"
 * (k = 1..ROUNDS) and k kept both in r12 and in counts[ID] (a round checks they agree:
 * registers and memory restored together); the BSP, after its own rounds, waits
 * (bounded) for every AP to finish and prints "all <CPUS> cpus done". More statuses:
 * 21 timed out waiting for the APs' rounds; 22 a CPU's r12 and counts[ID] disagree;
 * 23 an APIC ID >= CPUS.
 *
 * With WAIT_INPUT = 1 the BSP, after its own "cpu 0 up", waits (bounded) for a byte on
 * COM1 before it wakes the APs (24: none came): a VM saved there has its APs still in
 * KVM's wait-for-SIPI state, and the byte is typed into the restored one.
 *
 * The bounded waits use the TSC, which jumps forward over a restore where KVM cannot
 * set it (emulation-only hosts): on expiry the count is read once more before failing.
 *
 * The APs start in KVM's wait-for-SIPI state (the in-kernel local APIC emulates INIT and
 * SIPI); KVM needs none of the real-hardware delays between the IPIs, so the guest only
 * waits for each ICR write to be accepted (delivery status) and a few hundred
 * iterations. The UART is shared by every CPU: a spinlock (xchg, implicitly locked)
 * serialises whole lines. */
#include "tiny.h"
#ifndef CPUS
#define CPUS 2
#endif

/* Where the real-mode trampoline is copied: page-aligned below 1 MiB (the SIPI vector is
 * its page number) and clear of everything the VMM writes (vmm/arch/x86_64/layout.py:
 * boot GDT/IDT at 0x500, zero page 0x7000, boot stack below 0x8ff0, page tables
 * 0x9000-0xefff, command line 0x20000, MP table 0x9fc00). */
#define TRAMPOLINE      0x3000
#define SIPI_VECTOR     (TRAMPOLINE >> 12)
#define TRAMP(label)    (TRAMPOLINE + (label) - trampoline_start)
/* The VMM's identity page tables (layout.PML4_START), reused by the APs. */
#define PML4            0x9000

/* Local APIC (Intel SDM vol. 3, 10.4.1 and table 10-1) at layout.LAPIC_START. */
#define LAPIC           0xfee00000
#define LAPIC_ID        (LAPIC + 0x20)     /* APIC ID in bits 31:24 */
#define LAPIC_SVR       (LAPIC + 0xf0)     /* spurious interrupt vector register */
#define LAPIC_ICR_LO    (LAPIC + 0x300)
#define LAPIC_ICR_HI    (LAPIC + 0x310)
#define SVR_ENABLE      0x100              /* APIC software enable */
#define SPURIOUS_VECTOR 0xff
#define ICR_DELIVERY_PENDING (1 << 12)
/* ICR low (SDM 10.6.1): shorthand "all excluding self" (bits 19:18 = 11b), level assert
 * (bit 14), delivery mode INIT (101b) or start-up (110b) in bits 10:8. */
#define ICR_ALL_BUT_SELF (3 << 18)
#define ICR_ASSERT      (1 << 14)
#define ICR_INIT        (ICR_ALL_BUT_SELF | ICR_ASSERT | (5 << 8))
#define ICR_SIPI        (ICR_ALL_BUT_SELF | ICR_ASSERT | (6 << 8) | SIPI_VECTOR)

#define MSR_EFER        0xc0000080
#define EFER_LME        (1 << 8)
#define CR0_PE          (1 << 0)
#define CR0_ET          (1 << 4)
#define CR0_PG          (1 << 31)
#define CR4_PAE         (1 << 5)

#define AP_STACK_SIZE   1024
/* BSP's wait for the APs, in TSC cycles: 2^35 (about 11 s at 3 GHz). */
#ifndef TIMEOUT_TSC
#define TIMEOUT_TSC     (1 << 35)
#endif
#define IPI_DELAY       200
#ifndef ROUNDS
#define ROUNDS          0
#endif
#ifndef STEP
#define STEP            20000
#endif
#ifndef WAIT_INPUT
#define WAIT_INPUT      0
#endif
#define LSR_DR          0x01               /* 8250 LSR: receive data ready */

/* Wait until the u32 at \var reaches \want or TIMEOUT_TSC cycles pass (then one more
 * look, then EXIT \fail). Clobbers rax, rdx, r8, r9. */
.macro WAIT_COUNT var, want, fail
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r8                      /* start */
    mov $TIMEOUT_TSC, %r9
1:  cmpl $\want, \var(%rip)
    jae 2f
    pause
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    sub %r8, %rdx
    cmp %r9, %rdx
    jb 1b
    cmpl $\want, \var(%rip)
    jae 2f
    EXIT \fail
2:
.endm

.code64
.globl _start
_start:
    /* Enable this local APIC (SVR), as an OS does before sending IPIs. */
    mov $LAPIC_SVR, %edi
    movl $(SVR_ENABLE | SPURIOUS_VECTOR), (%rdi)

    /* The BSP says hello like every AP does. */
    xor %eax, %eax
    call say_up

#if WAIT_INPUT
    /* Wait (bounded, re-checked on expiry) for a byte on COM1, then take it. */
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r8
    mov $TIMEOUT_TSC, %r9
1:  mov $COM1_LSR, %dx
    in (%dx), %al
    test $LSR_DR, %al
    jnz 2f
    pause
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    sub %r8, %rdx
    cmp %r9, %rdx
    jb 1b
    mov $COM1_LSR, %dx
    in (%dx), %al
    test $LSR_DR, %al
    jnz 2f
    EXIT 24
2:  mov $COM1, %dx
    in (%dx), %al
#endif

#if CPUS > 1
    /* Copy the trampoline below 1 MiB. */
    lea trampoline_start(%rip), %rsi
    mov $TRAMPOLINE, %edi
    mov $(trampoline_end - trampoline_start), %ecx
    rep movsb

    /* INIT, then two start-up IPIs (MP spec B.4, SDM 8.4.4.1), to every other CPU. */
    mov $ICR_INIT, %eax
    call send_ipi
    mov $ICR_SIPI, %eax
    call send_ipi
    mov $ICR_SIPI, %eax
    call send_ipi

    /* Wait (bounded) until every AP has counted itself in. */
    WAIT_COUNT ap_count, (CPUS - 1), 20
#endif
    call lock_uart
    PRINT all_up_msg_1
    mov $CPUS, %eax
    call print_dec
    PRINT all_up_msg_2
    call unlock_uart
#if ROUNDS > 0
    call do_rounds
    WAIT_COUNT done_count, (CPUS - 1), 21
    call lock_uart
    PRINT all_up_msg_1
    mov $CPUS, %eax
    call print_dec
    PRINT all_done_msg
    call unlock_uart
#endif
    EXIT 0

/* Write ICR (destination by shorthand, so ICR high is 0), wait until it is accepted,
 * then a short pause. eax = ICR low. Clobbers rcx, rdi. */
send_ipi:
    mov $LAPIC_ICR_HI, %edi
    movl $0, (%rdi)
    mov $LAPIC_ICR_LO, %edi
    mov %eax, (%rdi)
1:  testl $ICR_DELIVERY_PENDING, (%rdi)
    jz 2f
    pause
    jmp 1b
2:  mov $IPI_DELAY, %ecx
3:  pause
    loop 3b
    ret

/* Every CPU lands here in long mode, on the identity map, with its own stack. */
ap_main:
    mov $LAPIC_ID, %edi
    mov (%rdi), %eax
    shr $24, %eax
    call say_up
    lock incl ap_count(%rip)
#if ROUNDS > 0
    call do_rounds
    lock incl done_count(%rip)
#endif
1:  cli
    hlt
    jmp 1b

#if ROUNDS > 0
/* ROUNDS rounds of STEP iterations; after round k, counts[ID] = r12 = k and a line
 * "cpu <ID> <k>". Clobbers rax, rbx, rcx, rdx, rsi, rdi, r12, r13. */
do_rounds:
    mov $LAPIC_ID, %edi
    mov (%rdi), %r13d
    shr $24, %r13d                     /* r13 = APIC ID */
    cmp $CPUS, %r13d
    jb 1f
    EXIT 23
1:  xor %r12d, %r12d                   /* r12 = rounds done */
2:  mov $STEP, %ecx
3:  dec %ecx
    jnz 3b
    lea counts(%rip), %rdi
    cmp (%rdi,%r13,4), %r12d
    je 4f
    EXIT 22
4:  inc %r12d
    mov %r12d, (%rdi,%r13,4)
    call lock_uart
    PRINT cpu_msg_1
    mov %r13d, %eax
    call print_dec
    PRINT space_msg
    mov %r12d, %eax
    call print_dec
    PRINT newline_msg
    call unlock_uart
    cmp $ROUNDS, %r12d
    jb 2b
    ret
#endif

/* Print "cpu <eax> up\n" under the UART lock. */
say_up:
    push %rax
    call lock_uart
    PRINT cpu_msg_1
    mov (%rsp), %eax
    call print_dec
    PRINT cpu_msg_2
    call unlock_uart
    pop %rax
    ret

lock_uart:
    mov $1, %eax
1:  xchg %eax, uart_lock(%rip)        /* xchg with memory is always locked */
    test %eax, %eax
    jz 3f
2:  pause
    cmpl $0, uart_lock(%rip)
    jne 2b
    jmp 1b
3:  ret

unlock_uart:
    movl $0, uart_lock(%rip)
    ret

/* Print eax (0..999) in decimal. Clobbers rax, rbx, rcx, rdx, rsi. */
print_dec:
    lea numbuf+4(%rip), %rsi
    movb $0, (%rsi)
    mov $10, %ecx
1:  xor %edx, %edx
    div %ecx
    add $'0', %dl
    dec %rsi
    mov %dl, (%rsi)
    test %eax, %eax
    jnz 1b
    jmp print_polled

/* ---- The trampoline: copied to TRAMPOLINE, entered at CS:IP = SIPI_VECTOR<<8:0 ---- */
.code16
trampoline_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl TRAMP(tramp_gdtr)
    mov %cr0, %eax
    or $CR0_PE, %eax
    mov %eax, %cr0
    ljmpl $0x08, $TRAMP(tramp32)

.code32
tramp32:
    mov $0x18, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $PML4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov $(CR0_PG | CR0_ET | CR0_PE), %eax   /* also clears CD/NW left by INIT */
    mov %eax, %cr0
    ljmp $0x10, $TRAMP(tramp64)

.code64
tramp64:
    /* Stack: ap_stacks + (APIC ID + 1) * AP_STACK_SIZE. */
    mov $LAPIC_ID, %edi
    mov (%rdi), %eax
    shr $24, %eax
    inc %eax
    imul $AP_STACK_SIZE, %eax
    movabs $ap_stacks, %rsp
    add %rax, %rsp
    movabs $ap_main, %rax
    jmp *%rax

.balign 8
tramp_gdt:                              /* same selectors as cpu.BOOT_GDT, plus 0x08 */
    .quad 0
    .quad 0x00cf9b000000ffff            /* 0x08: 32-bit code, flat */
    .quad 0x00af9b000000ffff            /* 0x10: 64-bit code */
    .quad 0x00cf93000000ffff            /* 0x18: data, flat */
tramp_gdtr:
    .word 4 * 8 - 1
    .long TRAMP(tramp_gdt)
trampoline_end:

/* ---- Data ---- */
cpu_msg_1:    .asciz "cpu "
cpu_msg_2:    .asciz " up\n"
all_up_msg_1: .asciz "all "
all_up_msg_2: .asciz " cpus up\n"
all_done_msg: .asciz " cpus done\n"
space_msg:    .asciz " "
newline_msg:  .asciz "\n"
.balign 4
uart_lock:    .long 0
ap_count:     .long 0
done_count:   .long 0
counts:       .fill CPUS, 4, 0
numbuf:       .fill 8, 1, 0
.balign 16
ap_stacks:    .fill (CPUS + 1) * AP_STACK_SIZE, 1, 0

TINY_RUNTIME
