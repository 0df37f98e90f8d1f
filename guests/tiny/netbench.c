/* A minimal polled virtio-net driver (virtio-mmio version 2, virtio 1.2 §4.2.3, §5.1)
 * and frame workload for pyvmm's network benchmark (scripts/bench_net.py) and its guest
 * test (tests/vmm/test_net_guest.py). The NIC must be the first virtio device.
 *
 * Interpreted on an emulation-only KVM host (~1M instructions/s): per-frame work is a
 * few stores; buffers are built once per slot and reused; completions are found by
 * polling the used rings (VIRTQ_AVAIL_F_NO_INTERRUPT set, interrupts stay off).
 *
 * Build defines (tinyguest.build("netbench", {...})):
 *   MODE   0 = transmit COUNT frames; 1 = receive frames until an end frame
 *   FRAME  Ethernet frame bytes (without the 12-byte virtio_net_hdr_v1)
 *   COUNT  frames to transmit (MODE 0)
 *   QD     buffers kept posted / in flight
 *   STAMP  MMIO address written with 1 when the timed phase starts (MODE 0: before the
 *          first frame; MODE 1: at the first frame received) and 2 when it ends
 *
 * Frames: dst ff:ff:ff:ff:ff:ff, src 52:54:00:00:00:01, type 0x88b5 (local
 * experimental), then a le32 sequence number; seq 0xffffffff ends MODE 1.
 * Output: one UART line "netbench mode=M frames=N bytes=B". Exit status (port 0xf4):
 * 0 ok; 1x setup failed; 2x a bad completion.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#ifndef MODE
#define MODE 0
#endif
#ifndef FRAME
#define FRAME 1514
#endif
#ifndef COUNT
#define COUNT 1000
#endif
#ifndef QD
#define QD 16
#endif
#ifndef STAMP
#define STAMP 0xe0001000UL
#endif

#define HDR 12
#define BUFSZ (HDR + FRAME)
#define SLOT ((BUFSZ + 4095) & ~4095UL)
#define END_SEQ 0xffffffffu

#define VIRTIO_BASE 0xd0000000UL
#define RX_RING 0x00800000UL   /* desc, avail, used: 64 KiB each */
#define TX_RING 0x00840000UL
#define RX_BUF  0x01000000UL
#define TX_BUF  0x02000000UL
#define MAX_QSIZE 256

#define R_MAGIC        0x000
#define R_VERSION      0x004
#define R_DEVICE_ID    0x008
#define R_DEV_FEAT     0x010
#define R_DEV_FEAT_SEL 0x014
#define R_DRV_FEAT     0x020
#define R_DRV_FEAT_SEL 0x024
#define R_QUEUE_SEL    0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM    0x038
#define R_QUEUE_READY  0x044
#define R_QUEUE_NOTIFY 0x050
#define R_STATUS       0x070
#define R_DESC_LO      0x080
#define R_DESC_HI      0x084
#define R_DRIVER_LO    0x090
#define R_DRIVER_HI    0x094
#define R_DEVICE_LO    0x0a0
#define R_DEVICE_HI    0x0a4

#define S_ACKNOWLEDGE 1
#define S_DRIVER      2
#define S_DRIVER_OK   4
#define S_FEATURES_OK 8

#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1

#define FAIL_MAGIC     10
#define FAIL_DEVICE_ID 12
#define FAIL_NO_V1     13
#define FAIL_FEATURES  14
#define FAIL_QUEUE     15
#define FAIL_LAYOUT    16
#define FAIL_LEN       21   /* an rx completion with the wrong used length */
#define FAIL_ID        22   /* a used element names no slot */
#define FAIL_SEQ       23   /* frames received out of order */

struct desc { u64 addr; u32 len; u16 flags; u16 next; };

#define barrier() __asm__ volatile("" ::: "memory")

static inline u32 mmio_r32(u64 off) { return *(volatile u32 *)(VIRTIO_BASE + off); }
static inline void mmio_w32(u64 off, u32 v) { *(volatile u32 *)(VIRTIO_BASE + off) = v; }
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static __attribute__((noreturn)) void leave(u8 code)
{
    for (;;) {
        outb(0xf4, code);
        __asm__ volatile("hlt");
    }
}

static void putc_(char c)
{
    while (!(inb(0x3fd) & 0x20))
        ;
    outb(0x3f8, (u8)c);
}

static void puts_(const char *s) { while (*s) putc_(*s++); }

static void putdec(u64 v)
{
    char b[24];
    int i = 0;
    do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) putc_(b[--i]);
}

/* Queue setup (§4.2.3.2); returns its size. */
static u32 setup_queue(u32 index, u64 ring)
{
    mmio_w32(R_QUEUE_SEL, index);
    if (mmio_r32(R_QUEUE_READY)) leave(FAIL_QUEUE);
    u32 qsize = mmio_r32(R_QUEUE_NUM_MAX);
    if (!qsize) leave(FAIL_QUEUE);
    if (qsize > MAX_QSIZE) qsize = MAX_QSIZE;
    if (QD > qsize) leave(FAIL_LAYOUT);
    mmio_w32(R_QUEUE_NUM, qsize);
    mmio_w32(R_DESC_LO, (u32)ring);
    mmio_w32(R_DESC_HI, 0);
    mmio_w32(R_DRIVER_LO, (u32)(ring + 0x10000));
    mmio_w32(R_DRIVER_HI, 0);
    mmio_w32(R_DEVICE_LO, (u32)(ring + 0x20000));
    mmio_w32(R_DEVICE_HI, 0);
    *(volatile u16 *)(ring + 0x10000) = AVAIL_F_NO_INTERRUPT;   /* we poll (§2.7.7) */
    mmio_w32(R_QUEUE_READY, 1);
    return qsize;
}

void main(void)
{
    volatile u64 *stamp = (volatile u64 *)STAMP;
    u64 ring = MODE == 0 ? TX_RING : RX_RING;
    u64 bufs = MODE == 0 ? TX_BUF : RX_BUF;
    volatile struct desc *desc = (volatile struct desc *)ring;
    volatile u16 *avail = (volatile u16 *)(ring + 0x10000);
    volatile u16 *used = (volatile u16 *)(ring + 0x20000);
    volatile u32 *used_elem = (volatile u32 *)(ring + 0x20004);

    /* §3.1.1 device initialisation */
    if (mmio_r32(R_MAGIC) != 0x74726976 || mmio_r32(R_VERSION) != 2) leave(FAIL_MAGIC);
    if (mmio_r32(R_DEVICE_ID) != 1) leave(FAIL_DEVICE_ID);
    mmio_w32(R_STATUS, 0);
    mmio_w32(R_STATUS, S_ACKNOWLEDGE);
    mmio_w32(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio_w32(R_DEV_FEAT_SEL, 1);
    if (!(mmio_r32(R_DEV_FEAT) & 1)) leave(FAIL_NO_V1);
    mmio_w32(R_DRV_FEAT_SEL, 0);     /* accept VIRTIO_F_VERSION_1 (bit 32) only */
    mmio_w32(R_DRV_FEAT, 0);
    mmio_w32(R_DRV_FEAT_SEL, 1);
    mmio_w32(R_DRV_FEAT, 1);
    mmio_w32(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_r32(R_STATUS) & S_FEATURES_OK)) leave(FAIL_FEATURES);
    u32 qsize = setup_queue(MODE == 0 ? 1 : 0, ring);
    mmio_w32(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    u32 q = MODE == 0 ? 1 : 0;

    /* Every slot: one descriptor over its whole buffer; tx frames built once. */
    for (u32 s = 0; s < QD; s++) {
        u64 b = bufs + (u64)s * SLOT;
        desc[s].addr = b;
        desc[s].len = BUFSZ;
        desc[s].flags = MODE == 0 ? 0 : DESC_F_WRITE;
        desc[s].next = 0;
        for (u64 a = b; a < b + BUFSZ; a += 4096)   /* pre-fault the pages */
            *(volatile u8 *)a = 0;
        if (MODE == 0) {
            volatile u8 *f = (volatile u8 *)(b + HDR);
            for (int i = 0; i < 6; i++) f[i] = 0xff;
            f[6] = 0x52; f[7] = 0x54; f[8] = 0; f[9] = 0; f[10] = 0; f[11] = 1;
            f[12] = 0x88; f[13] = 0xb5;
        }
    }

    u64 issued = 0, done = 0, bytes = 0;
    u16 avail_idx = 0, used_idx = 0;
    u32 expect = 0;

    if (MODE == 0) {
        *stamp = 1;
        for (u32 s = 0; s < QD && issued < COUNT; s++) {
            *(volatile u32 *)(bufs + (u64)s * SLOT + HDR + 14) = (u32)issued++;
            avail[2 + avail_idx % qsize] = (u16)s;
            barrier();
            avail[1] = ++avail_idx;
        }
        mmio_w32(R_QUEUE_NOTIFY, q);
        while (done < COUNT) {
            u16 now = used[1];
            if (now == used_idx)
                continue;
            barrier();
            int submitted = 0;
            while (used_idx != now) {
                u32 s = used_elem[2 * (used_idx % qsize)];
                used_idx++;
                if (s >= QD) leave(FAIL_ID);
                done++;
                bytes += FRAME;
                if (issued < COUNT) {
                    *(volatile u32 *)(bufs + (u64)s * SLOT + HDR + 14) = (u32)issued++;
                    avail[2 + avail_idx % qsize] = (u16)s;
                    barrier();
                    avail[1] = ++avail_idx;
                    submitted = 1;
                }
            }
            if (submitted)
                mmio_w32(R_QUEUE_NOTIFY, q);
        }
        *stamp = 2;
    } else {
        for (u32 s = 0; s < QD; s++) {
            avail[2 + avail_idx % qsize] = (u16)s;
            barrier();
            avail[1] = ++avail_idx;
        }
        mmio_w32(R_QUEUE_NOTIFY, q);
        for (;;) {
            u16 now = used[1];
            if (now == used_idx)
                continue;
            barrier();
            int end = 0;
            while (used_idx != now) {
                u32 s = used_elem[2 * (used_idx % qsize)];
                u32 len = used_elem[2 * (used_idx % qsize) + 1];
                used_idx++;
                if (s >= QD) leave(FAIL_ID);
                if (len != BUFSZ) leave(FAIL_LEN);
                u32 seq = *(volatile u32 *)(bufs + (u64)s * SLOT + HDR + 14);
                if (seq == END_SEQ) {
                    end = 1;
                } else {
                    if (done == 0) *stamp = 1;
                    if (seq < expect) leave(FAIL_SEQ);
                    expect = seq + 1;
                    done++;
                    bytes += FRAME;
                }
                avail[2 + avail_idx % qsize] = (u16)s;
                barrier();
                avail[1] = ++avail_idx;
            }
            if (end)
                break;
            mmio_w32(R_QUEUE_NOTIFY, q);
        }
        *stamp = 2;
    }

    puts_("netbench mode=");
    putdec(MODE);
    puts_(" frames=");
    putdec(done);
    puts_(" bytes=");
    putdec(bytes);
    puts_("\n");
    leave(0);
}

/* Entry: the VMM starts us in long mode with RSP = 0x8ff0 and interrupts off. */
__asm__(".section .text.start\n"
        ".globl _start\n"
        "_start:\n"
        "    and $-16, %rsp\n"
        "    call main\n"
        "1:  hlt\n"
        "    jmp 1b\n");
