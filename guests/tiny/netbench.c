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

#include "virtio_mmio.h"

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

#define RX_RING 0x00800000UL   /* desc, avail, used: 64 KiB each */
#define TX_RING 0x00840000UL
#define RX_BUF  0x01000000UL
#define TX_BUF  0x02000000UL
#define MAX_QSIZE 256

/* Failure codes (debug-exit status; 10-15 set-up: virtio_mmio.h) */
#define FAIL_LAYOUT    16
#define FAIL_LEN       21   /* an rx completion with the wrong used length */
#define FAIL_ID        22   /* a used element names no slot */
#define FAIL_SEQ       23   /* frames received out of order */

/* Queue setup (§4.2.3.2); returns its size. */
static u32 setup_queue(u32 index, u64 ring)
{
    u32 qsize = vq_select(index, MAX_QSIZE);
    if (QD > qsize) leave(FAIL_LAYOUT);
    vq_enable(qsize, ring);
    return qsize;
}

void main(void)
{
    volatile u64 *stamp = (volatile u64 *)STAMP;
    u64 ring = MODE == 0 ? TX_RING : RX_RING;
    u64 bufs = MODE == 0 ? TX_BUF : RX_BUF;
    volatile struct desc *desc = (volatile struct desc *)ring;
    volatile u16 *avail = (volatile u16 *)(ring + VQ_AVAIL_OFF);
    volatile u16 *used = (volatile u16 *)(ring + VQ_USED_OFF);
    volatile u32 *used_elem = (volatile u32 *)(ring + VQ_USED_OFF + 4);

    /* §3.1.1 device initialisation */
    virtio_begin(1);
    virtio_accept_v1_only();
    u32 qsize = setup_queue(MODE == 0 ? 1 : 0, ring);
    virtio_driver_ok();
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
            vq_push(avail, &avail_idx, qsize, (u16)s);
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
                    vq_push(avail, &avail_idx, qsize, (u16)s);
                    submitted = 1;
                }
            }
            if (submitted)
                mmio_w32(R_QUEUE_NOTIFY, q);
        }
        *stamp = 2;
    } else {
        for (u32 s = 0; s < QD; s++) {
            vq_push(avail, &avail_idx, qsize, (u16)s);
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
                vq_push(avail, &avail_idx, qsize, (u16)s);
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

TINY_C_ENTRY
