/* A virtio-blk write left in flight for a snapshot (tests/vmm/test_snapshot_inflight.py).
 *
 * The guest sets up virtio-blk over virtio-mmio version 2 as blkbench.c does (virtio 1.2
 * §3.1.1, §4.2.3), builds one write request of a known pattern and makes it available
 * (§2.7.13) WITHOUT a QueueNotify: the device is not obliged to look at the ring before
 * a notification (§2.7.13.3 "notify the device"), and pyvmm's only looks on one, so the
 * request stays available and unused until something serves the queue. Then it prints
 * "inflight: available" and polls the used ring (§2.7.8), bounded by TIMEOUT_TSC cycles.
 * The test snapshots the VM on that line; the restored VM serves the queue once before
 * its vCPUs run (VirtioMmioTransport.kick_all), so the restored guest sees the request
 * used and checks its status byte (§5.2.6: VIRTIO_BLK_S_OK = 0).
 *
 * The timeout is measured with the TSC, which jumps forward over a restore on hosts
 * that cannot set it (the pause's length): so on expiry the used ring is read once more
 * before giving up, and a request served before the vCPU resumed is still seen.
 *
 * Build defines: SECTOR (where the request writes, default 8), LEN (bytes, a multiple of
 * 512, default 4096), TIMEOUT_TSC (default 2^33 cycles, about 3 s at 2.6 GHz).
 *
 * Exit status (port 0xf4): 0 the write completed with VIRTIO_BLK_S_OK; 1x setup failed;
 * 20 the status byte was not VIRTIO_BLK_S_OK; 21 the used element names another
 * descriptor; 22 the used idx moved by more than one; 30 timed out (never used).
 */

#include "virtio_mmio.h"

#ifndef SECTOR
#define SECTOR 8
#endif
#ifndef LEN
#define LEN 4096
#endif
#ifndef TIMEOUT_TSC
#define TIMEOUT_TSC (1UL << 33)
#endif

/* Guest-physical memory this guest uses (identity-mapped; RAM is zero at start). */
#define RING_BASE   0x00800000UL   /* desc table, avail ring, used ring: 64 KiB each */
#define HDR_BASE    0x00830000UL   /* 16-byte request header, status byte at +16 */
#define BUF_BASE    0x01000000UL   /* LEN bytes of data */
#define QSIZE       16

#define T_OUT 1                    /* VIRTIO_BLK_T_OUT (§5.2.6) */
#define BLK_S_OK 0                 /* VIRTIO_BLK_S_OK */

/* Failure codes (debug-exit status; 10-15 set-up: virtio_mmio.h) */
#define FAIL_STATUS    20
#define FAIL_ID        21
#define FAIL_USED_IDX  22
#define FAIL_TIMEOUT   30

struct blk_hdr { u32 type; u32 reserved; u64 sector; };

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

/* The 8 bytes at disk byte offset `off` (blkbench.c's pattern; the test recomputes it). */
static inline u64 pattern(u64 off) { return (off * 0x9e3779b97f4a7c15UL) ^ 0x5ca1ab1e00000000UL; }

void main(void)
{
    volatile struct desc *desc = (volatile struct desc *)RING_BASE;
    volatile u16 *avail = (volatile u16 *)(RING_BASE + VQ_AVAIL_OFF);
    volatile u16 *used = (volatile u16 *)(RING_BASE + VQ_USED_OFF);
    volatile u32 *used_elem = (volatile u32 *)(RING_BASE + VQ_USED_OFF + 4);
    volatile struct blk_hdr *hdr = (volatile struct blk_hdr *)HDR_BASE;
    volatile u8 *status = (volatile u8 *)(HDR_BASE + 16);
    volatile u64 *buf = (volatile u64 *)BUF_BASE;

    /* §3.1.1 device initialisation, VIRTIO_F_VERSION_1 only; queue 0 (§4.2.3.2) */
    virtio_begin(2);
    virtio_accept_v1_only();
    if (vq_select(0, QSIZE) < QSIZE) leave(FAIL_QUEUE);
    vq_enable(QSIZE, RING_BASE);
    virtio_driver_ok();

    /* One write request: header, data, status (§5.2.6) in descriptors 0, 1, 2. */
    hdr->type = T_OUT;
    hdr->sector = SECTOR;
    *status = 0xff;
    for (u64 i = 0; i < LEN / 8; i++)
        buf[i] = pattern(SECTOR * 512UL + i * 8);
    desc[0].addr = HDR_BASE;
    desc[0].len = 16;
    desc[0].flags = DESC_F_NEXT;
    desc[0].next = 1;
    desc[1].addr = BUF_BASE;
    desc[1].len = LEN;
    desc[1].flags = DESC_F_NEXT;
    desc[1].next = 2;
    desc[2].addr = HDR_BASE + 16;
    desc[2].len = 1;
    desc[2].flags = DESC_F_WRITE;
    desc[2].next = 0;

    /* Make it available (§2.7.13.2: ring entry, then the idx), and do not notify. */
    avail[2] = 0;
    barrier();
    avail[1] = 1;
    puts_("inflight: available\n");

    u64 start = rdtsc();
    for (;;) {
        if (used[1] != 0)
            break;
        if (rdtsc() - start > TIMEOUT_TSC) {
            if (used[1] != 0)           /* served while the TSC jumped (a restore) */
                break;
            puts_("inflight: timed out\n");
            leave(FAIL_TIMEOUT);
        }
        __asm__ volatile("pause");
    }
    barrier();
    if (used[1] != 1) leave(FAIL_USED_IDX);
    if (used_elem[0] != 0) leave(FAIL_ID);
    if (*status != BLK_S_OK) leave(FAIL_STATUS);
    puts_("inflight: done\n");
    leave(0);
}

TINY_C_ENTRY
