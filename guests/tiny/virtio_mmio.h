/* What pyvmm's polled C virtio guests (blkbench.c, netbench.c, blkinflight.c) share:
 * port I/O, the debug-exit and UART output, and a minimal virtio-mmio version 2 driver
 * (virtio 1.2 §4.2.2 registers, §3.1.1 initialisation, §4.2.3.2 queue set-up) over split
 * rings laid out as desc table, avail ring, used ring at 64 KiB steps from one base.
 *
 * Include it first; a guest may define VIRTIO_BASE before it (default: the first virtio
 * device, 0xd0000000). The set-up helpers exit with the codes below on failure. */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#ifndef VIRTIO_BASE
#define VIRTIO_BASE 0xd0000000UL
#endif

/* virtio-mmio registers (§4.2.2) */
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
#define R_CONFIG       0x100

/* Device status bits (§2.1) */
#define S_ACKNOWLEDGE 1
#define S_DRIVER      2
#define S_DRIVER_OK   4
#define S_FEATURES_OK 8

/* Split virtqueue (§2.7.5, §2.7.6) */
#define DESC_F_NEXT  1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define VQ_AVAIL_OFF 0x10000       /* flags, idx, ring[] */
#define VQ_USED_OFF  0x20000       /* flags, idx, then {id, len} elements at +4 */

struct desc { u64 addr; u32 len; u16 flags; u16 next; };

/* Set-up failure codes (debug-exit status) */
#define FAIL_MAGIC     10
#define FAIL_VERSION   11
#define FAIL_DEVICE_ID 12
#define FAIL_NO_V1     13
#define FAIL_FEATURES  14
#define FAIL_QUEUE     15

#define barrier() __asm__ volatile("" ::: "memory")

static inline u32 mmio_r32(u64 off) { return *(volatile u32 *)(VIRTIO_BASE + off); }
static inline void mmio_w32(u64 off, u32 v) { *(volatile u32 *)(VIRTIO_BASE + off) = v; }
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* Stop the VM with status `code` (debug-exit port 0xf4). */
static __attribute__((noreturn)) void leave(u8 code)
{
    for (;;) {
        outb(0xf4, code);
        __asm__ volatile("hlt");
    }
}

/* COM1 output, polling LSR.THRE before each byte. */
static inline void putc_(char c)
{
    while (!(inb(0x3fd) & 0x20))
        ;
    outb(0x3f8, (u8)c);
}

static inline void puts_(const char *s) { while (*s) putc_(*s++); }

static inline void putdec(u64 v)
{
    char b[24];
    int i = 0;
    do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) putc_(b[--i]);
}

/* §3.1.1 steps 1-3: check the transport (§4.2.2: magic "virt", version 2) and the
 * device type, reset, then ACKNOWLEDGE and DRIVER. */
static void virtio_begin(u32 device_id)
{
    if (mmio_r32(R_MAGIC) != 0x74726976) leave(FAIL_MAGIC);
    if (mmio_r32(R_VERSION) != 2) leave(FAIL_VERSION);
    if (mmio_r32(R_DEVICE_ID) != device_id) leave(FAIL_DEVICE_ID);
    mmio_w32(R_STATUS, 0);
    mmio_w32(R_STATUS, S_ACKNOWLEDGE);
    mmio_w32(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
}

/* §3.1.1 steps 4-6: accept VIRTIO_F_VERSION_1 (bit 32, §6) only, set FEATURES_OK and
 * check that the device kept it. */
static void virtio_accept_v1_only(void)
{
    mmio_w32(R_DEV_FEAT_SEL, 1);
    if (!(mmio_r32(R_DEV_FEAT) & 1)) leave(FAIL_NO_V1);
    mmio_w32(R_DRV_FEAT_SEL, 0);
    mmio_w32(R_DRV_FEAT, 0);
    mmio_w32(R_DRV_FEAT_SEL, 1);
    mmio_w32(R_DRV_FEAT, 1);
    mmio_w32(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_r32(R_STATUS) & S_FEATURES_OK)) leave(FAIL_FEATURES);
}

/* §4.2.3.2 steps 1-3: select queue `index`, check it is not in use and exists; returns
 * its maximum size, at most `max`. */
static u32 vq_select(u32 index, u32 max)
{
    mmio_w32(R_QUEUE_SEL, index);
    if (mmio_r32(R_QUEUE_READY)) leave(FAIL_QUEUE);
    u32 n = mmio_r32(R_QUEUE_NUM_MAX);
    if (!n) leave(FAIL_QUEUE);
    return n < max ? n : max;
}

/* §4.2.3.2 steps 5-8 for the selected queue: size `qsize`, rings at `ring` (below
 * 4 GiB), polled (VIRTQ_AVAIL_F_NO_INTERRUPT, §2.7.7), then QueueReady. */
static void vq_enable(u32 qsize, u64 ring)
{
    mmio_w32(R_QUEUE_NUM, qsize);
    mmio_w32(R_DESC_LO, (u32)ring);
    mmio_w32(R_DESC_HI, 0);
    mmio_w32(R_DRIVER_LO, (u32)(ring + VQ_AVAIL_OFF));
    mmio_w32(R_DRIVER_HI, 0);
    mmio_w32(R_DEVICE_LO, (u32)(ring + VQ_USED_OFF));
    mmio_w32(R_DEVICE_HI, 0);
    *(volatile u16 *)(ring + VQ_AVAIL_OFF) = AVAIL_F_NO_INTERRUPT;
    mmio_w32(R_QUEUE_READY, 1);
}

/* §3.1.1 step 8: the driver is ready. */
static inline void virtio_driver_ok(void)
{
    mmio_w32(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* Make descriptor chain `head` available (§2.7.13.2: the ring entry, then the idx). */
static inline void vq_push(volatile u16 *avail, u16 *avail_idx, u32 qsize, u16 head)
{
    avail[2 + *avail_idx % qsize] = head;
    barrier();
    avail[1] = ++*avail_idx;
}

/* Entry: the VMM starts us in long mode with RSP = 0x8ff0 and interrupts off. Write
 * TINY_C_ENTRY once, at the end of the guest (after main, as its section switch is). */
#define TINY_C_ENTRY                    \
    __asm__(".section .text.start\n"    \
            ".globl _start\n"           \
            "_start:\n"                 \
            "    and $-16, %rsp\n"      \
            "    call main\n"           \
            "1:  hlt\n"                 \
            "    jmp 1b\n");
