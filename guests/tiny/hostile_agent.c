/* A guest agent that speaks the ttyS1 protocol (vmm/guest.py, guests/agent/agent.c)
 * badly, for tests/vmm/test_hostile_agent.py. It runs as the "kernel" of a
 * vmm.Guest: started in long mode at its ELF entry like any ELF kernel, it ignores
 * the zero page and talks to the second UART (COM2) by polling, far faster here than
 * booting Linux. Notes for the test go to the console (COM1), one line each.
 *
 * Build define MODE (tinyguest.build("hostile_agent", {"MODE": n})):
 *   0 MUTE       READY, then never reads or answers anything
 *   1 ONCE       answers the first ANSWERS RUNs (EXIT 0; default 1), then is MUTE
 *   2 FORGE      READY; unsolicited STDOUT "forged" and EXIT 99 before any command;
 *                "between done" on the console; then answers every RUN with
 *                STDOUT "real\n", EXIT 0, followed each time by a forged EXIT 77
 *                and "answered" on the console
 *   3 FLOOD      READY, FLOOD bytes of STDOUT frames while no command runs, "between
 *                done" on the console, then per RUN: FLOOD bytes of STDOUT, EXIT 0
 *   4 HUGE       READY, then a frame header claiming 0xffffffff bytes
 *   5 UNKNOWN    READY, then a frame of unknown type 'Z'
 *   6 TRUNCATED  READY; on RUN: a STDOUT header for 100 bytes, 10 bytes, silence
 *   7 SILENT     never says READY
 * FLOOD: bytes (default 1 MiB), sent as 4 KiB frames with `rep outsb` (one exit per
 * frame on KVM, each byte still goes through the UART model).
 */

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long u64;

#ifndef MODE
#define MODE 0
#endif
#ifndef ANSWERS
#define ANSWERS 1
#endif
#ifndef FLOOD
#define FLOOD (1 << 20)
#endif

#define COM1 0x3f8
#define COM2 0x2f8
#define LSR 5
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define CHUNK 4096

static inline void outb(unsigned short port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(unsigned short port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static void put(unsigned short base, const void *p, u64 n)
{
	const u8 *b = p;
	while (n--) {
		while (!(inb(base + LSR) & LSR_THRE))
			;
		outb(base, *b++);
	}
}

/* n bytes to COM2 in one string instruction (the UART model is always ready). */
static void put_fast(const void *p, u64 n)
{
	__asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"((unsigned short)COM2) : "memory");
}

static void say(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	put(COM1, s, n);
}

static u8 get(void)
{
	while (!(inb(COM2 + LSR) & LSR_DR))
		;
	return inb(COM2);
}

static void header(u8 type, u32 len)
{
	u8 h[5] = {type, (u8)len, (u8)(len >> 8), (u8)(len >> 16), (u8)(len >> 24)};
	put(COM2, h, 5);
}

static void frame(u8 type, const void *payload, u32 len)
{
	header(type, len);
	put(COM2, payload, len);
}

static void exit_frame(int code)
{
	u8 x[5] = {0, (u8)code, (u8)(code >> 8), (u8)(code >> 16), (u8)(code >> 24)};
	frame('X', x, 5);
}

static void ready(void)
{
	frame('Y', "pyvmm-agent 1", 13);
}

/* Wait for one host frame and skip its payload; returns its type. */
static u8 take_frame(void)
{
	u8 h[5];
	u32 len, i;
	for (i = 0; i < 5; i++)
		h[i] = get();
	len = h[1] | h[2] << 8 | h[3] << 16 | (u32)h[4] << 24;
	for (i = 0; i < len; i++)
		get();
	return h[0];
}

static u8 chunk[5 + CHUNK];

static void flood(u64 bytes)
{
	u64 i;
	chunk[0] = 'O';
	chunk[1] = 0;
	chunk[2] = CHUNK >> 8;
	chunk[3] = chunk[4] = 0;
	for (i = 5; i < sizeof chunk; i++)
		chunk[i] = 'a' + i % 26;
	for (i = 0; i < bytes; i += CHUNK)
		put_fast(chunk, sizeof chunk);
}

/* Never answer again: halt with interrupts off (the vCPU sleeps; the host's
 * input waits in the UART's bounded FIFO). */
static void mute(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

void main(void)
{
	if (MODE != 7)
		ready();
	switch (MODE) {
	case 0:
		mute();
	case 1:
		for (int i = 0; i < ANSWERS; i++) {
			take_frame();
			exit_frame(0);
		}
		mute();
	case 2:
		frame('O', "forged", 6);
		exit_frame(99);
		say("between done\n");
		for (;;) {
			take_frame();
			frame('O', "real\n", 5);
			exit_frame(0);
			exit_frame(77);
			say("answered\n");
		}
	case 3:
		flood(FLOOD);
		say("between done\n");
		for (;;) {
			take_frame();
			flood(FLOOD);
			exit_frame(0);
		}
	case 4:
		header('O', 0xffffffffu);
		mute();
	case 5:
		frame('Z', "??", 2);
		mute();
	case 6:
		take_frame();
		header('O', 100);
		put(COM2, "0123456789", 10);
		mute();
	default:
		say("silent\n");
		mute();
	}
}

__asm__(".section .text.start\n"
	".globl _start\n"
	"_start:\n"
	"    and $-16, %rsp\n"
	"    call main\n"
	"1:  hlt\n"
	"    jmp 1b\n");
