/* A minimal polled virtio-blk driver (virtio-mmio version 2, virtio 1.2 §4.2.3, §5.2)
 * and block workload for pyvmm's disk benchmark (scripts/bench_blk.py) and its guest
 * test (tests/vmm/test_blk_guest.py).
 *
 * This code is interpreted on an emulation-only KVM host (~1M instructions/s), so all
 * per-request work is a handful of stores: descriptors, headers and buffers are built
 * once per in-flight slot and reused; completions are found by polling the used ring
 * (VIRTQ_AVAIL_F_NO_INTERRUPT set, interrupts stay off).
 *
 * Build defines (tinyguest.build("blkbench", {...})):
 *   MODE      0 = sequential read, 1 = sequential write, 2 = random read
 *   BS        bytes per request (a multiple of 512)
 *   COUNT     requests to complete (0: as many BS-sized requests as fit the disk)
 *   QD        requests kept in flight
 *   SEED      LCG seed (random sectors; MODE 2)
 *   CHECKSUM  1: fold every byte read into a checksum printed at the end (slow here)
 *   PATTERN   1: before each write fill its buffer with pattern(disk byte offset)
 *   STAMP     MMIO address written with 1 before the first request is submitted and
 *             with 2 after the last completion (the benchmark's clock)
 *
 * Output: one UART line "blkbench mode=M reqs=N bytes=B csum=0x...". Exit status (port
 * 0xf4): 0 ok; 1x setup failed (see fail codes below); 2x a request failed.
 */

#include "virtio_mmio.h"

#ifndef MODE
#define MODE 0
#endif
#ifndef BS
#define BS (1 << 20)
#endif
#ifndef COUNT
#define COUNT 0
#endif
#ifndef QD
#define QD 4
#endif
#ifndef SEED
#define SEED 1
#endif
#ifndef CHECKSUM
#define CHECKSUM 0
#endif
#ifndef PATTERN
#define PATTERN 0
#endif
#ifndef STAMP
#define STAMP 0xe0001000UL
#endif

#define MODE_SEQREAD 0
#define MODE_SEQWRITE 1
#define MODE_RANDREAD 2

/* Guest-physical memory this guest uses (identity-mapped; RAM is zero at start). */
#define RING_BASE   0x00800000UL   /* desc table, avail ring, used ring: 64 KiB each */
#define HDR_BASE    0x00830000UL   /* per slot: 16-byte header, status byte at +16 */
#define BUF_BASE    0x01000000UL   /* per slot: BS bytes of data */
#define MAX_QSIZE   256

/* virtio-blk config space (§5.2.4) and feature bits (§5.2.3) */
#define CFG_CAPACITY 0x00
#define CFG_SIZE_MAX 0x08
#define CFG_SEG_MAX  0x0c
#define F_SIZE_MAX 1
#define F_SEG_MAX  2

#define T_IN  0
#define T_OUT 1

/* Failure codes (debug-exit status; 10-15 set-up: virtio_mmio.h) */
#define FAIL_LAYOUT    16   /* QD * descriptors per request do not fit the queue */
#define FAIL_SMALL     17   /* the disk holds fewer than one request */
#define FAIL_STATUS    20   /* a completion's status byte was not 0 */
#define FAIL_LEN       21   /* a read completed with the wrong used length */
#define FAIL_ID        22   /* a used element names a descriptor that is no head */
#define FAIL_USED_IDX  23   /* the used idx moved by more than the requests in flight */

struct blk_hdr { u32 type; u32 reserved; u64 sector; };

static void puthex(u64 v)
{
    puts_("0x");
    for (int s = 60; s >= 0; s -= 4) putc_("0123456789abcdef"[(v >> s) & 15]);
}

/* The value of the 8 bytes at disk byte offset `off` in PATTERN writes (the test
 * recomputes it on the host). */
static inline u64 pattern(u64 off) { return (off * 0x9e3779b97f4a7c15UL) ^ 0x5ca1ab1e00000000UL; }

/* Per-request checksum: FNV-1a-style over the request's 64-bit words, seeded with its
 * sector; requests are summed, so the total does not depend on completion order. */
static u64 checksum(const volatile u64 *p, u64 sector)
{
    u64 h = 0xcbf29ce484222325UL ^ sector;
    for (u64 i = 0; i < BS / 8; i++)
        h = (h ^ p[i]) * 0x100000001b3UL;
    return h;
}

static u64 lcg_state = SEED;

static inline u64 lcg(void)
{
    lcg_state = lcg_state * 6364136223846793005UL + 1442695040888963407UL;
    return lcg_state >> 33;
}

void main(void)
{
    volatile struct desc *desc = (volatile struct desc *)RING_BASE;
    volatile u16 *avail = (volatile u16 *)(RING_BASE + VQ_AVAIL_OFF);
    volatile u16 *used = (volatile u16 *)(RING_BASE + VQ_USED_OFF);
    volatile u32 *used_elem = (volatile u32 *)(RING_BASE + VQ_USED_OFF + 4);
    volatile u64 *stamp = (volatile u64 *)STAMP;

    /* §3.1.1 device initialisation; the low feature word is read for size_max/seg_max */
    virtio_begin(2);
    mmio_w32(R_DEV_FEAT_SEL, 0);
    u32 feat_lo = mmio_r32(R_DEV_FEAT);
    virtio_accept_v1_only();

    /* Config space: capacity in 512-byte sectors; size_max/seg_max limit a data
     * descriptor / the data descriptors of one request (§5.2.4). Reading them is
     * allowed whether or not the feature was negotiated. */
    u64 capacity = mmio_r32(R_CONFIG + CFG_CAPACITY)
                   | (u64)mmio_r32(R_CONFIG + CFG_CAPACITY + 4) << 32;
    u32 seg_size = BS;
    if (feat_lo & (1 << F_SIZE_MAX)) {
        u32 size_max = mmio_r32(R_CONFIG + CFG_SIZE_MAX) & ~511u;
        if (size_max && size_max < seg_size) seg_size = size_max;
    }
    u32 nseg = (BS + seg_size - 1) / seg_size;
    if (feat_lo & (1 << F_SEG_MAX) && nseg > mmio_r32(R_CONFIG + CFG_SEG_MAX))
        leave(FAIL_LAYOUT);
    u32 per_req = nseg + 2;            /* header, data segments, status */

    /* Queue 0 (§4.2.3.2) */
    u32 qsize = vq_select(0, MAX_QSIZE);
    if ((u64)QD * per_req > qsize) leave(FAIL_LAYOUT);
    vq_enable(qsize, RING_BASE);
    virtio_driver_ok();

    /* The workload */
    u64 blocks = capacity / (BS / 512);
    u64 count = COUNT ? COUNT : blocks;
    if (!blocks) leave(FAIL_SMALL);

    /* Build every slot's chain once: slot s uses descriptors s*per_req ... */
    for (u32 s = 0; s < QD; s++) {
        u32 d = s * per_req;
        volatile struct blk_hdr *hdr = (volatile struct blk_hdr *)(HDR_BASE + 32 * s);
        hdr->type = MODE == MODE_SEQWRITE ? T_OUT : T_IN;
        desc[d].addr = (u64)hdr;
        desc[d].len = 16;
        desc[d].flags = DESC_F_NEXT;
        desc[d].next = d + 1;
        for (u32 i = 0; i < nseg; i++) {
            u32 len = BS - i * seg_size < seg_size ? BS - i * seg_size : seg_size;
            desc[d + 1 + i].addr = BUF_BASE + (u64)s * BS + (u64)i * seg_size;
            desc[d + 1 + i].len = len;
            desc[d + 1 + i].flags = DESC_F_NEXT | (MODE == MODE_SEQWRITE ? 0 : DESC_F_WRITE);
            desc[d + 1 + i].next = d + 2 + i;
        }
        desc[d + 1 + nseg].addr = HDR_BASE + 32 * s + 16;
        desc[d + 1 + nseg].len = 1;
        desc[d + 1 + nseg].flags = DESC_F_WRITE;
        desc[d + 1 + nseg].next = 0;
    }

    /* Touch every page of the data buffers once, so that the VMM's first preadv into
     * each one does not pay the host's page faults inside the timed phase. */
    for (u64 a = BUF_BASE; a < BUF_BASE + (u64)QD * BS; a += 4096)
        *(volatile u8 *)a = 0;

    u64 issued = 0, done = 0, next_block = 0, csum = 0;
    u16 avail_idx = 0, used_idx = 0;
    u64 slot_sector[QD];

    *stamp = 1;                        /* timed phase starts */
    for (u32 s = 0; s < QD && issued < count; s++, issued++) {
        volatile struct blk_hdr *hdr = (volatile struct blk_hdr *)(HDR_BASE + 32 * s);
        u64 blk = MODE == MODE_RANDREAD ? lcg() % blocks : next_block++ % blocks;
        u64 sector = blk * (BS / 512);
        hdr->sector = sector;
        slot_sector[s] = sector;
        *(volatile u8 *)(HDR_BASE + 32 * s + 16) = 0xff;
        if (PATTERN && MODE == MODE_SEQWRITE) {
            volatile u64 *p = (volatile u64 *)(BUF_BASE + (u64)s * BS);
            for (u64 i = 0; i < BS / 8; i++) p[i] = pattern(sector * 512 + i * 8);
        }
        vq_push(avail, &avail_idx, qsize, (u16)(s * per_req));
    }
    mmio_w32(R_QUEUE_NOTIFY, 0);

    while (done < count) {
        u16 now = used[1];
        if (now == used_idx)
            continue;
        /* At most issued - done requests can have completed. A device that stored
         * the idx non-atomically (a transient 0) once made this look like 65533. */
        if ((u16)(now - used_idx) > issued - done) leave(FAIL_USED_IDX);
        barrier();
        int submitted = 0;
        while (used_idx != now) {
            u32 id = used_elem[2 * (used_idx % qsize)];
            u32 len = used_elem[2 * (used_idx % qsize) + 1];
            used_idx++;
            u32 s = id / per_req;
            if (id % per_req || s >= QD) leave(FAIL_ID);
            if (*(volatile u8 *)(HDR_BASE + 32 * s + 16) != 0) leave(FAIL_STATUS);
            if (MODE != MODE_SEQWRITE && len != BS + 1) leave(FAIL_LEN);
            if (CHECKSUM && MODE != MODE_SEQWRITE)
                csum += checksum((volatile u64 *)(BUF_BASE + (u64)s * BS), slot_sector[s]);
            done++;
            if (issued < count) {
                volatile struct blk_hdr *hdr = (volatile struct blk_hdr *)(HDR_BASE + 32 * s);
                u64 blk = MODE == MODE_RANDREAD ? lcg() % blocks : next_block++ % blocks;
                u64 sector = blk * (BS / 512);
                hdr->sector = sector;
                slot_sector[s] = sector;
                *(volatile u8 *)(HDR_BASE + 32 * s + 16) = 0xff;
                if (PATTERN && MODE == MODE_SEQWRITE) {
                    volatile u64 *p = (volatile u64 *)(BUF_BASE + (u64)s * BS);
                    for (u64 i = 0; i < BS / 8; i++) p[i] = pattern(sector * 512 + i * 8);
                }
                vq_push(avail, &avail_idx, qsize, (u16)(s * per_req));
                issued++;
                submitted = 1;
            }
        }
        if (submitted)
            mmio_w32(R_QUEUE_NOTIFY, 0);
    }
    *stamp = 2;                        /* timed phase ends */

    puts_("blkbench mode=");
    putdec(MODE);
    puts_(" reqs=");
    putdec(done);
    puts_(" bytes=");
    putdec(done * BS);
    puts_(" csum=");
    puthex(csum);
    puts_("\n");
    leave(0);
}

TINY_C_ENTRY
