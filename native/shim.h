/* pyvmm run-loop shim: KVM_RUN in C with the GIL released, plus the serial fast path.
 * Everything here has a Python twin (vmm/vcpu.py's VcpuLoop with loop="python", and
 * vmm/devices/serial8250.py) that the tests compare it against. */
#include <stdint.h>
#include <stddef.h>

/* Transmit buffer shared by every vCPU and the console thread: bytes the guest wrote to
 * the UART, in order. Producers block (with a timeout) when it is full; the consumer is
 * woken through notify_fd (an eventfd) when it goes from empty to non-empty. */
struct shim_txbuf;

/* The UART fast path: Python keeps these in step with its Serial8250 model. */
struct shim_serial {
    uint16_t base;            /* I/O port of the UART (0x3f8) */
    volatile int32_t tx_fast; /* 1: a THR write only outputs the byte (polled mode) */
    volatile int32_t lsr;     /* value an LSR read returns; -1: let Python answer */
    struct shim_txbuf *tx;
};

struct shim_vcpu {
    int fd;                   /* vCPU fd */
    void *run;                /* mmap'd struct kvm_run */
    struct shim_serial *serial; /* NULL: no fast path */
    uint64_t fast_exits;      /* exits handled here without returning to Python */
    uint64_t exits;           /* all exits */
};

/* Run the vCPU until an exit Python must handle. Returns the KVM exit reason,
 * SHIM_EXIT_INTR when KVM_RUN was interrupted (signal / immediate_exit), or -errno. */
#define SHIM_EXIT_INTR 10
int shim_run(struct shim_vcpu *v);

struct shim_txbuf *shim_tx_new(size_t capacity, int notify_fd);
void shim_tx_free(struct shim_txbuf *b);
/* Append bytes (blocks while full, up to ~1 s, then drops). Returns bytes stored. */
size_t shim_tx_push(struct shim_txbuf *b, const uint8_t *data, size_t n);
/* Move up to max buffered bytes into out; returns how many. */
size_t shim_tx_take(struct shim_txbuf *b, uint8_t *out, size_t max);
/* Stop blocking producers (when the VM ends). */
void shim_tx_close(struct shim_txbuf *b);

/* Install a no-op handler for the signal used to kick vCPU threads out of KVM_RUN
 * (SA_RESTART off, so KVM_RUN returns EINTR). Idempotent. Returns 0 or -errno. */
int shim_install_kick_handler(int signo);

/* A full memory barrier (mfence on x86-64). Orders a store to memory a vCPU shares
 * before a later load from it, which plain Python code cannot: virtio's event-idx
 * checks need it (virtio 1.x section 2.7.10; see vmm/memory.py memory_barrier). */
void shim_mb(void);

/* Bare loop used by the benchmark as the limit: KVM_RUN until an exit that is not a
 * port write; returns the number of exits. No device logic at all. */
uint64_t shim_bare_run(int fd, void *run, uint16_t stop_port, int32_t *last_reason);
