/* avxstate: is a process's AVX register state its own?
 *
 * If the OS has enabled AVX for user space (CPUID.1:ECX.OSXSAVE and XCR0 bits 1-2),
 * two processes ping-pong one byte over pipes, each holding its own pattern in YMM7
 * across every blocking read/write (so the kernel switches between them there), and
 * check all 256 bits afterwards. Prints one line:
 *   "avxstate: disabled xcr0=0x..."                  AVX off for user space: fine
 *   "avxstate: preserved rounds=N xcr0=0x..."         AVX on and never disturbed: fine
 *   "avxstate: LEAKED rounds=N bad=B xcr0=0x..."      exit status 1
 * Built with glibc, it first prints whether glibc's own functions use AVX:
 *   "avxstate: glibc-avx=active|inactive"
 * (the guest's /init keeps glibc off AVX where the kernel does not switch AVX state).
 * Built static at test time (tests/run/test_cpu_state.py); raw system calls around
 * the checked registers, so no library code can touch YMM7 in between.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <sys/platform/x86.h>
#endif

static int os_enabled_avx(unsigned *xcr0)
{
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    *xcr0 = 0;
    if (!(c & (1u << 27)))          /* OSXSAVE: XGETBV is usable */
        return 0;
    __asm__ volatile("xgetbv" : "=a"(a), "=d"(d) : "c"(0));
    *xcr0 = a;
    return (a & 6) == 6;             /* SSE and AVX state enabled */
}

/* One blocking read/write of one byte with YMM7 = pattern; returns 256-bit mismatches. */
static int io_keeps_ymm7(long nr, int fd, char *byte, uint64_t pattern)
{
    uint64_t in[4] = {pattern ^ 1, pattern ^ 2, pattern ^ 3, pattern ^ 4}, out[4];
    register uint64_t *pout __asm__("r9") = out;   /* SYSCALL preserves r9/r10 */
    register uint64_t *pin __asm__("r10") = in;
    long ret;
    __asm__ volatile("vmovdqu (%%r10), %%ymm7\n\t"
                     "syscall\n\t"
                     "vmovdqu %%ymm7, (%%r9)\n\t"
                     "vzeroupper"
                     : "=a"(ret), "+r"(pout), "+r"(pin)
                     : "a"(nr), "D"((long)fd), "S"(byte), "d"(1L)
                     : "rcx", "r11", "memory", "xmm7");
    int bad = ret != 1;
    for (int i = 0; i < 4; i++)
        bad += out[i] != in[i];
    return bad;
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 2000;
    unsigned xcr0;
#ifdef __GLIBC__
    printf("avxstate: glibc-avx=%s\n",
           CPU_FEATURE_ACTIVE(AVX) || CPU_FEATURE_ACTIVE(AVX2) || CPU_FEATURE_ACTIVE(AVX512F)
           ? "active" : "inactive");
#endif
    if (!os_enabled_avx(&xcr0)) {
        printf("avxstate: disabled xcr0=%#x\n", xcr0);
        return 0;
    }
    int to_child[2], to_parent[2];
    if (pipe(to_child) || pipe(to_parent))
        return 2;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        return 2;
    int child = pid == 0, bad = 0;
    uint64_t base = child ? 0xc0de000000000000ull : 0xfeed000000000000ull;
    char byte = 'x';
    /* Every round runs to the end (a side that stopped early would leave the other
     * blocked in read); mismatches are only counted. */
    for (int i = 0; i < rounds; i++) {
        if (child) {
            bad += io_keeps_ymm7(SYS_read, to_child[0], &byte, base + 16 * i);
            bad += io_keeps_ymm7(SYS_write, to_parent[1], &byte, base + 16 * i + 8);
        } else {
            bad += io_keeps_ymm7(SYS_write, to_child[1], &byte, base + 16 * i);
            bad += io_keeps_ymm7(SYS_read, to_parent[0], &byte, base + 16 * i + 8);
        }
    }
    if (child)
        _exit(bad > 255 ? 255 : bad);
    int status;
    if (waitpid(pid, &status, 0) != pid)
        return 2;
    if (!WIFEXITED(status))
        bad += 1000;
    else
        bad += WEXITSTATUS(status);
    printf("avxstate: %s rounds=%d bad=%d xcr0=%#x\n", bad ? "LEAKED" : "preserved", rounds,
           bad, xcr0);
    return bad ? 1 : 0;
}
