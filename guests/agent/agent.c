/*
 * pyvmm-agent: runs commands for the host over the guest's second UART (ttyS1).
 *
 * Started by /init when the kernel command line has `pyvmm.agent`. Frames, both ways:
 *
 *     type: u8 | length: u32 little-endian | payload: `length` bytes
 *
 * host -> guest
 *   'R' RUN      u32 argc, u32 envc, then NUL-terminated strings: workdir ("" = keep),
 *                argv[0..argc), env[0..envc) as "KEY=VALUE"
 *   'I' INIT     i64 seconds, i64 nanoseconds (the host's CLOCK_REALTIME), then up to
 *                MAX_ENTROPY bytes of host entropy: sent after a restore from a
 *                snapshot, so that guests restored from one snapshot are not clones:
 *                the agent sets the clock, credits the entropy to the kernel's pool
 *                (RNDADDENTROPY) and reseeds the CRNG (RNDRESEEDCRNG), then answers
 *                READY again
 * guest -> host
 *   'Y' READY    payload "pyvmm-agent 1" (protocol version); sent once at start, and
 *                after each INIT
 *   'O' STDOUT   a chunk of the command's standard output, as it comes
 *   'E' STDERR   a chunk of its standard error
 *   'X' EXIT     u8 how (0: exited, 1: killed by a signal), i32 code (status / signal)
 *
 * One command at a time: RUN -> any number of O/E -> one X; then the next RUN.
 * Two variables of a RUN's environment are for the agent itself (never passed on):
 * PYVMM_OUTSIDE_ROOT=1 runs the command outside --root; PYVMM_USER=UID:GID[:G1,G2]
 * runs it as that user (after the chroot).
 * The command gets stdin = /dev/null and two pipes; argv[0] is looked up in PATH
 * (a failed exec reports status 127 and a message on its stderr, as shells do).
 * Processes it leaves behind keep running; the agent is a child subreaper and reaps
 * every orphan. Kernel messages stay on ttyS0 (the console); the agent never writes
 * there except its own diagnostics on stderr.
 *
 * `pyvmm-agent --mount OP...` (run as a command by the host, vmm/guest.py) sets up the
 * disks of a guest restored from the snapshot cache in one process instead of a dozen
 * (each process costs ~0.5 s of interpreted kernel time on emulation-only hosts):
 *   wait NAME        until /sys/block/NAME/size is not 0 (the disk inserted into an
 *                    empty drive has been seen; bounded, ~10 s)
 *   root DEV DIR     mount DEV (ext4/ext3/ext2) read-write at DIR, bind /proc /sys
 *                    /dev into it and a tmpfs at DIR/tmp, as /init does at boot, and
 *                    record DIR in ROOT_RECORD: later commands run chrooted there
 *   ro DEV DIR       mkdir -p DIR, mount DEV (ext4) read-only there
 *
 * `pyvmm-agent --daemon DEVICE` (the interactive default guest, `pyvmm.shell-agent`):
 * the agent forks; the parent returns (status 0) once the child has been sent its first
 * INIT, so that /init starts the shell after that: the host saves the guest's "shell
 * ready" snapshot at READY and then sends INIT, and a restore sends INIT, so the shell
 * prints its prompt in the session that shows it. The parent gives up after
 * DAEMON_WAIT_S (status 1) rather than keep the shell from a host that never sends it.
 *
 * Built with `gcc -static -Os` by vmm/guestbuild.py. Kept small: each system call costs
 * interpreted ring-0 time on emulation-only KVM hosts, so the agent reads and writes in
 * big chunks and sleeps in poll() rather than looping.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <grp.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/prctl.h>
#include <time.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define T_RUN 'R'
#define T_READY 'Y'
#define T_STDOUT 'O'
#define T_STDERR 'E'
#define T_EXIT 'X'
#define T_INIT 'I'
#define MAX_ENTROPY 512
/* <linux/random.h>'s ioctls, spelled out: musl-gcc does not see the kernel headers. */
#ifndef RNDADDENTROPY
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#endif
#ifndef RNDRESEEDCRNG
#define RNDRESEEDCRNG _IO('R', 0x07)
#endif

#define MAX_PAYLOAD (1u << 20) /* bound on what the host may send in one frame */
#define CHUNK 4096

#define DAEMON_WAIT_S 60

static int chan = -1;
/* --daemon: the pipe to the waiting parent, written and closed at the first INIT. */
static int release_fd = -1;
static int sigpipe_fds[2];
/* --root DIR: the root filesystem commands run in (pyvmm run --rootfs). */
static const char *root_dir;

static void die(const char *what)
{
	fprintf(stderr, "pyvmm-agent: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("write to channel");
		}
		p += w;
		n -= (size_t)w;
	}
}

static void read_all(int fd, void *buf, size_t n)
{
	char *p = buf;
	while (n) {
		ssize_t r = read(fd, p, n);
		if (r == 0) {
			fprintf(stderr, "pyvmm-agent: channel closed\n");
			exit(1);
		}
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("read from channel");
		}
		p += r;
		n -= (size_t)r;
	}
}

static void send_frame(uint8_t type, const void *payload, uint32_t len)
{
	/* One write per frame when it fits: fewer system calls. */
	static char buf[5 + CHUNK];
	buf[0] = (char)type;
	buf[1] = (char)(len & 0xff);
	buf[2] = (char)((len >> 8) & 0xff);
	buf[3] = (char)((len >> 16) & 0xff);
	buf[4] = (char)((len >> 24) & 0xff);
	if (len <= CHUNK) {
		memcpy(buf + 5, payload, len);
		write_all(chan, buf, 5 + len);
	} else {
		write_all(chan, buf, 5);
		write_all(chan, payload, len);
	}
}

static uint32_t le32(const unsigned char *p)
{
	return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p)
{
	return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static void on_sigchld(int sig)
{
	int saved = errno;
	(void)sig;
	(void)!write(sigpipe_fds[1], "c", 1);
	errno = saved;
}

/* Split `n` NUL-terminated strings off payload[*off..len); NULL if malformed. */
static char **take_strings(char *payload, uint32_t len, uint32_t *off, uint32_t n)
{
	char **v;
	uint32_t i;
	if (n > len) /* each string takes at least its NUL */
		return NULL;
	v = calloc(n + 1, sizeof(char *));
	if (!v)
		return NULL;
	for (i = 0; i < n; i++) {
		char *end = memchr(payload + *off, '\0', len - *off);
		if (!end) {
			free(v);
			return NULL;
		}
		v[i] = payload + *off;
		*off = (uint32_t)(end - payload) + 1;
	}
	return v;
}

/* Forward what is readable on *fd as `type` frames; close it at EOF. Returns bytes read. */
static ssize_t forward(int *fd, uint8_t type)
{
	static char buf[CHUNK];
	ssize_t r = read(*fd, buf, sizeof buf);
	if (r > 0) {
		send_frame(type, buf, (uint32_t)r);
	} else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
		close(*fd);
		*fd = -1;
	}
	return r;
}

/* Where `--mount root` records the root filesystem it mounted (initramfs, not a disk). */
#define ROOT_RECORD "/run/pyvmm-root"

static const char *recorded_root(void)
{
	static char buf[4096];
	int fd = open(ROOT_RECORD, O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
	if (fd >= 0)
		close(fd);
	if (n <= 0)
		return NULL;
	buf[n] = '\0';
	return buf;
}

/* PYVMM_USER=UID:GID[:G1,G2,...] in a command's environment (pyvmm run --image with
 * the image's User, resolved by the host): drop to that user, in the child, after the
 * chroot. Numbers only; at most MAX_GROUPS supplementary groups. */
#define MAX_GROUPS 64
static int become_user(const char *spec)
{
	gid_t groups[MAX_GROUPS];
	unsigned long uid, gid;
	size_t n = 0;
	char *end;

	errno = EINVAL;
	uid = strtoul(spec, &end, 10);
	if (end == spec || *end != ':')
		return -1;
	spec = end + 1;
	gid = strtoul(spec, &end, 10);
	if (end == spec || (*end && *end != ':'))
		return -1;
	while (*end) {
		spec = end + 1;
		if (!*spec)
			break;
		if (n == MAX_GROUPS)
			return -1;
		groups[n++] = (gid_t)strtoul(spec, &end, 10);
		if (end == spec || (*end && *end != ','))
			return -1;
	}
	if (setgroups(n, groups) < 0 || setgid((gid_t)gid) < 0 || setuid((uid_t)uid) < 0)
		return -1;
	return 0;
}

static void run_command(char *payload, uint32_t len)
{
	uint32_t off = 8, argc, envc, i;
	char *workdir, **argv, **envv;
	int out[2], err[2], status = 0, done = 0;
	unsigned char exit_payload[5];
	pid_t pid;

	if (len < 9)
		goto bad;
	argc = le32((unsigned char *)payload);
	envc = le32((unsigned char *)payload + 4);
	workdir = payload + off;
	if (!memchr(workdir, '\0', len - off))
		goto bad;
	off += (uint32_t)strlen(workdir) + 1;
	argv = take_strings(payload, len, &off, argc);
	envv = argv ? take_strings(payload, len, &off, envc) : NULL;
	if (!argv || !envv || argc == 0)
		goto bad;

	if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0)
		die("pipe");
	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		int null = open("/dev/null", O_RDONLY);
		dup2(null, 0);
		dup2(out[1], 1);
		dup2(err[1], 2);
		signal(SIGCHLD, SIG_DFL);
		signal(SIGPIPE, SIG_DFL);
		setsid(); /* its own session: no controlling tty, own process group */
		for (i = 0; i < envc; i++)
			putenv(envv[i]);
		/* With --root, or once `--mount root` recorded one in ROOT_RECORD (a root
		 * filesystem the host mounted after the agent started: a guest restored
		 * from the snapshot cache; kept in the guest, so a snapshot of it keeps
		 * it too), commands run chrooted into the guest's root filesystem, except
		 * the host's own housekeeping (mounting copy-in images, copying out),
		 * which it marks with PYVMM_OUTSIDE_ROOT=1. */
		const char *root = root_dir ? root_dir : recorded_root();
		if (root && !getenv("PYVMM_OUTSIDE_ROOT") && (chroot(root) < 0 || chdir("/") < 0)) {
			fprintf(stderr, "pyvmm-agent: cannot enter %s: %s\n", root, strerror(errno));
			_exit(126);
		}
		unsetenv("PYVMM_OUTSIDE_ROOT");
		if (getenv("PYVMM_USER") && become_user(getenv("PYVMM_USER")) < 0) {
			fprintf(stderr, "pyvmm-agent: cannot become user %s: %s\n",
				getenv("PYVMM_USER"), strerror(errno));
			_exit(126);
		}
		unsetenv("PYVMM_USER");
		if (workdir[0] && chdir(workdir) < 0) {
			fprintf(stderr, "pyvmm-agent: cannot change directory to %s: %s\n",
				workdir, strerror(errno));
			_exit(126);
		}
		execvp(argv[0], argv);
		fprintf(stderr, "pyvmm-agent: cannot run %s: %s\n", argv[0], strerror(errno));
		_exit(errno == ENOENT ? 127 : 126);
	}
	free(argv);
	free(envv);
	close(out[1]);
	close(err[1]);

	/* Stream until the command has exited; then send what is left in the pipes
	 * (a background process that keeps them open must not hold up the EXIT). */
	while (!done) {
		struct pollfd p[3] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0},
				      {sigpipe_fds[0], POLLIN, 0}};
		if (poll(p, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (p[0].revents)
			forward(&out[0], T_STDOUT);
		if (p[1].revents)
			forward(&err[0], T_STDERR);
		if (p[2].revents) {
			char c[64];
			pid_t w;
			int st;
			(void)!read(sigpipe_fds[0], c, sizeof c);
			while ((w = waitpid(-1, &st, WNOHANG)) > 0)
				if (w == pid) {
					status = st;
					done = 1;
				}
		}
	}
	for (i = 0; i < 2; i++) {
		int *fd = i ? &err[0] : &out[0];
		if (*fd < 0)
			continue;
		fcntl(*fd, F_SETFL, O_NONBLOCK);
		while (*fd >= 0 && forward(fd, i ? T_STDERR : T_STDOUT) > 0)
			;
		if (*fd >= 0)
			close(*fd);
	}
	if (WIFSIGNALED(status)) {
		exit_payload[0] = 1;
		status = WTERMSIG(status);
	} else {
		exit_payload[0] = 0;
		status = WEXITSTATUS(status);
	}
	memcpy(exit_payload + 1, &status, 4); /* x86-64: little-endian */
	send_frame(T_EXIT, exit_payload, sizeof exit_payload);
	return;
bad:
	fprintf(stderr, "pyvmm-agent: malformed RUN frame (%u bytes)\n", len);
	{
		static const char msg[] = "pyvmm-agent: malformed RUN frame\n";
		int code = 2;
		send_frame(T_STDERR, msg, sizeof msg - 1);
		exit_payload[0] = 0;
		memcpy(exit_payload + 1, &code, 4);
		send_frame(T_EXIT, exit_payload, sizeof exit_payload);
	}
}

/* INIT: the host's clock and entropy for a guest restored from a snapshot. Failures are
 * reported on stderr (the console) and otherwise ignored: the guest still works. */
static void init_after_restore(const unsigned char *p, uint32_t len)
{
	struct {
		int entropy_count;
		int buf_size;
		unsigned char buf[MAX_ENTROPY];
	} pool;
	struct timespec ts;
	uint32_t n;
	int fd;

	if (len < 16 || len > 16 + MAX_ENTROPY) {
		fprintf(stderr, "pyvmm-agent: malformed INIT frame (%u bytes)\n", len);
		return;
	}
	ts.tv_sec = (time_t)le64(p);
	ts.tv_nsec = (long)le64(p + 8);
	if (ts.tv_nsec < 0 || ts.tv_nsec >= 1000000000L || clock_settime(CLOCK_REALTIME, &ts) < 0)
		perror("pyvmm-agent: clock_settime");
	n = len - 16;
	if (n == 0)
		return;
	fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		perror("pyvmm-agent: /dev/urandom");
		return;
	}
	pool.entropy_count = (int)(n * 8);
	pool.buf_size = (int)n;
	memcpy(pool.buf, p + 16, n);
	if (ioctl(fd, RNDADDENTROPY, &pool) < 0)
		perror("pyvmm-agent: RNDADDENTROPY");
	if (ioctl(fd, RNDRESEEDCRNG) < 0)
		perror("pyvmm-agent: RNDRESEEDCRNG");
	close(fd);
}

static int mkdir_p(const char *path)
{
	char buf[4096];
	size_t n = strlen(path), i;
	if (n == 0 || n >= sizeof buf)
		return errno = ENAMETOOLONG, -1;
	memcpy(buf, path, n + 1);
	for (i = 1; i <= n; i++) {
		if (buf[i] != '/' && buf[i] != '\0')
			continue;
		buf[i] = '\0';
		if (mkdir(buf, 0755) < 0 && errno != EEXIST)
			return -1;
		buf[i] = i < n ? '/' : '\0';
	}
	return 0;
}

static int mount_fs(const char *dev, const char *dir, unsigned long flags)
{
	static const char *const types[] = { "ext4", "ext3", "ext2" };
	size_t i;
	if (mkdir_p(dir) < 0)
		return -1;
	for (i = 0; i < sizeof types / sizeof types[0]; i++)
		if (mount(dev, dir, types[i], flags, NULL) == 0)
			return 0;
	return -1;
}

static int wait_for_disk(const char *name)
{
	char path[256], buf[32];
	int i;
	snprintf(path, sizeof path, "/sys/block/%s/size", name);
	for (i = 0; i < 1000; i++) {
		struct timespec ts = { 0, 10 * 1000 * 1000 };
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
		if (fd >= 0)
			close(fd);
		if (n > 0 && !(buf[0] == '0' && (n == 1 || buf[1] == '\n')))
			return 0;
		nanosleep(&ts, NULL);
	}
	return errno = ENOMEDIUM, -1;
}

static int mount_main(int argc, char **argv)
{
	int i = 0;
	char sub[4096];
	static const char *const binds[] = { "proc", "sys", "dev" };
	while (i < argc) {
		const char *op = argv[i];
		if (strcmp(op, "wait") == 0 && i + 1 < argc) {
			if (wait_for_disk(argv[i + 1]) < 0)
				goto fail;
			i += 2;
		} else if (strcmp(op, "ro") == 0 && i + 2 < argc) {
			if (mount_fs(argv[i + 1], argv[i + 2], MS_RDONLY) < 0)
				goto fail;
			i += 3;
		} else if (strcmp(op, "root") == 0 && i + 2 < argc) {
			const char *dir = argv[i + 2];
			size_t b;
			if (mount_fs(argv[i + 1], dir, 0) < 0)
				goto fail;
			for (b = 0; b < sizeof binds / sizeof binds[0]; b++) {
				snprintf(sub, sizeof sub, "/%s", binds[b]);
				char target[4096];
				snprintf(target, sizeof target, "%s/%s", dir, binds[b]);
				if (mkdir_p(target) < 0 || mount(sub, target, NULL, MS_BIND, NULL) < 0)
					goto fail;
			}
			snprintf(sub, sizeof sub, "%s/tmp", dir);
			if (mkdir_p(sub) < 0 || mount("tmpfs", sub, "tmpfs", 0, NULL) < 0)
				goto fail;
			if (mkdir_p("/run") < 0)
				goto fail;
			int fd = open(ROOT_RECORD ".tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
			if (fd < 0 || write(fd, dir, strlen(dir)) != (ssize_t)strlen(dir) || close(fd) < 0
			    || rename(ROOT_RECORD ".tmp", ROOT_RECORD) < 0)
				goto fail;
			i += 3;
		} else {
			fprintf(stderr, "pyvmm-agent --mount: bad operation %s\n", op);
			return 2;
		}
		continue;
fail:
		fprintf(stderr, "pyvmm-agent --mount %s %s: %s\n", op, argv[i + 1], strerror(errno));
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	const char *dev;
	static const char ready[] = "pyvmm-agent 1";
	struct termios t;
	struct sigaction sa;

	if (argc > 1 && strcmp(argv[1], "--mount") == 0)
		return mount_main(argc - 2, argv + 2);
	if (argc > 1 && strcmp(argv[1], "--daemon") == 0) {
		int p[2];
		pid_t pid;
		struct pollfd pfd;
		char c;
		if (pipe2(p, O_CLOEXEC) < 0)
			die("pipe");
		pid = fork();
		if (pid < 0)
			die("fork");
		if (pid > 0) {
			close(p[1]);
			pfd.fd = p[0];
			pfd.events = POLLIN;
			if (poll(&pfd, 1, DAEMON_WAIT_S * 1000) == 1 && read(p[0], &c, 1) == 1)
				return 0;
			fprintf(stderr, "pyvmm-agent: no INIT from the host after %d s\n", DAEMON_WAIT_S);
			return 1;
		}
		close(p[0]);
		release_fd = p[1];
		setsid();
		argc--;
		argv++;
	}
	/* pyvmm-agent [--root DIR] [DEVICE] */
	if (argc > 2 && strcmp(argv[1], "--root") == 0) {
		root_dir = argv[2];
		argc -= 2;
		argv += 2;
	}
	dev = argc > 1 ? argv[1] : "/dev/ttyS1";
	chan = open(dev, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (chan < 0)
		die(dev);
	if (tcgetattr(chan, &t) < 0)
		die("tcgetattr");
	cfmakeraw(&t); /* no echo, no line editing, no CR/LF translation, no XON/XOFF */
	t.c_cflag |= CLOCAL | CREAD;
	t.c_cc[VMIN] = 1;
	t.c_cc[VTIME] = 0;
	cfsetspeed(&t, B115200); /* irrelevant for a virtual UART */
	if (tcsetattr(chan, TCSANOW, &t) < 0)
		die("tcsetattr");
	tcflush(chan, TCIOFLUSH);

	if (pipe2(sigpipe_fds, O_CLOEXEC | O_NONBLOCK) < 0)
		die("pipe");
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_sigchld;
	sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
	sigaction(SIGCHLD, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	prctl(PR_SET_CHILD_SUBREAPER, 1);

	send_frame(T_READY, ready, sizeof ready - 1);
	for (;;) {
		unsigned char hdr[5];
		uint32_t len;
		char *payload;
		read_all(chan, hdr, 5);
		len = le32(hdr + 1);
		if (len > MAX_PAYLOAD) {
			fprintf(stderr, "pyvmm-agent: frame of %u bytes refused\n", len);
			exit(1);
		}
		payload = malloc(len + 1);
		if (!payload)
			die("malloc");
		read_all(chan, payload, len);
		payload[len] = '\0';
		if (hdr[0] == T_RUN) {
			run_command(payload, len);
		} else if (hdr[0] == T_INIT) {
			init_after_restore((const unsigned char *)payload, len);
			send_frame(T_READY, ready, sizeof ready - 1);
			if (release_fd >= 0) {
				if (write(release_fd, "", 1) < 0)
					perror("pyvmm-agent: release");
				close(release_fd);
				release_fd = -1;
			}
		} else
			fprintf(stderr, "pyvmm-agent: unknown frame type %#x ignored\n", hdr[0]);
		free(payload);
	}
}
