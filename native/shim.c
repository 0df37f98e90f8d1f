/* See shim.h. Small and boring on purpose: device logic lives in Python. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include "shim.h"

#define UART_THR 0
#define UART_LSR 5

struct shim_txbuf {
    pthread_mutex_t lock;     /* protects everything below */
    pthread_cond_t space;     /* signalled when the consumer took bytes */
    uint8_t *data;
    size_t cap, head, len;    /* ring buffer */
    int notify_fd;
    int closed;
};

struct shim_txbuf *shim_tx_new(size_t capacity, int notify_fd)
{
    struct shim_txbuf *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->data = malloc(capacity);
    if (!b->data) {
        free(b);
        return NULL;
    }
    b->cap = capacity;
    b->notify_fd = notify_fd;
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->space, NULL);
    return b;
}

void shim_tx_free(struct shim_txbuf *b)
{
    if (!b)
        return;
    pthread_mutex_destroy(&b->lock);
    pthread_cond_destroy(&b->space);
    free(b->data);
    free(b);
}

void shim_tx_close(struct shim_txbuf *b)
{
    pthread_mutex_lock(&b->lock);
    b->closed = 1;
    pthread_cond_broadcast(&b->space);
    pthread_mutex_unlock(&b->lock);
}

static void notify(struct shim_txbuf *b)
{
    uint64_t one = 1;
    if (b->notify_fd >= 0 && write(b->notify_fd, &one, sizeof(one)) < 0) {
        /* eventfd counter saturated or closed: the consumer polls anyway */
    }
}

size_t shim_tx_push(struct shim_txbuf *b, const uint8_t *data, size_t n)
{
    size_t done = 0;
    int was_empty;

    pthread_mutex_lock(&b->lock);
    was_empty = b->len == 0;
    while (done < n) {
        if (b->len == b->cap) {
            struct timespec t;
            if (b->closed)
                break;
            if (was_empty) {
                notify(b);
                was_empty = 0;
            }
            clock_gettime(CLOCK_REALTIME, &t);
            t.tv_sec += 1;
            if (pthread_cond_timedwait(&b->space, &b->lock, &t) == ETIMEDOUT && b->len == b->cap)
                break; /* nobody is draining: drop rather than hang the vCPU */
            was_empty = b->len == 0;
            continue;
        }
        b->data[(b->head + b->len) % b->cap] = data[done++];
        b->len++;
    }
    if (was_empty && b->len)
        notify(b);
    pthread_mutex_unlock(&b->lock);
    return done;
}

size_t shim_tx_take(struct shim_txbuf *b, uint8_t *out, size_t max)
{
    size_t n, first;

    pthread_mutex_lock(&b->lock);
    n = b->len < max ? b->len : max;
    first = b->cap - b->head < n ? b->cap - b->head : n;
    memcpy(out, b->data + b->head, first);
    memcpy(out + first, b->data, n - first);
    b->head = (b->head + n) % b->cap;
    b->len -= n;
    if (n)
        pthread_cond_broadcast(&b->space);
    pthread_mutex_unlock(&b->lock);
    return n;
}

static void kick_handler(int signo)
{
    (void)signo;
}

int shim_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: KVM_RUN must return EINTR */
    return sigaction(signo, &sa, NULL) ? -errno : 0;
}

/* Handles the exit in C if it is a UART access the fast path owns; returns 1 if so. */
static int serial_fast(struct shim_serial *s, struct kvm_run *run)
{
    uint8_t *data;
    uint16_t off;

    if (run->io.port < s->base || run->io.port > s->base + 7 || run->io.size != 1)
        return 0;
    off = run->io.port - s->base;
    data = (uint8_t *)run + run->io.data_offset;
    if (run->io.direction == KVM_EXIT_IO_OUT && off == UART_THR && s->tx_fast) {
        shim_tx_push(s->tx, data, run->io.count);
        return 1;
    }
    if (run->io.direction == KVM_EXIT_IO_IN && off == UART_LSR && s->lsr >= 0) {
        memset(data, s->lsr, run->io.count);
        return 1;
    }
    return 0;
}

int shim_run(struct shim_vcpu *v)
{
    struct kvm_run *run = v->run;

    for (;;) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                return SHIM_EXIT_INTR;
            return -errno;
        }
        v->exits++;
        if (run->exit_reason == KVM_EXIT_IO && v->serial && serial_fast(v->serial, run)) {
            v->fast_exits++;
            continue;
        }
        return run->exit_reason;
    }
}

uint64_t shim_bare_run(int fd, void *runp, uint16_t stop_port, int32_t *last_reason)
{
    struct kvm_run *run = runp;
    uint64_t n = 0;

    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0) {
            *last_reason = -errno;
            return n;
        }
        n++;
        if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT ||
            run->io.port == stop_port) {
            *last_reason = run->exit_reason;
            return n;
        }
    }
}

void shim_mb(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
