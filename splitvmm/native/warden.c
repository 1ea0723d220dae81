/* The device warden (splitvmm/sandbox/device.py): the parent, outside its PID namespace, of
 * one sandboxed device process; it outlives the device and then dies the way it died, so
 * that whoever watches the warden's pid (the launcher, the monitor) sees the device's end.
 *
 * Why C: the warden used to be the Python interpreter the device forked it from, idle for
 * the device's whole life yet holding a private copy of every page the device wrote after
 * the fork (~3 MiB of PSS per device, and a whole interpreter to trust). This program is
 * static (no loader, no library to open) and does nothing but the above.
 *
 * Usage: warden CHILD FILTER_FD. It is exec'd already confined, like the device: its fds
 * (stderr, the device's liveness pipe, the filter), no capabilities, no_new_privs, a
 * Landlock domain that lets it execute this file and nothing else, its rlimits. It makes
 * itself not dumpable (exec made it so again), then loads the seccomp filter (raw BPF,
 * policies/<arch>/warden.policy as libseccomp compiled it) read from FILTER_FD, and waits.
 */
#define _GNU_SOURCE /* strerrordesc_np */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static struct sock_filter program[BPF_MAXINSNS];

/* One line on stderr, then exit 1. snprintf into a static buffer and write(2): no stdio
 * buffer to allocate, as warden.policy allows no memory calls once the filter is on. */
static _Noreturn void fail(const char *what)
{
	static char line[256];
	const char *why = strerrordesc_np(errno); /* a static string: strerror may allocate */
	int len = snprintf(line, sizeof(line), "splitvmm: device warden failed: %s: %s\n", what,
			   why ? why : "unknown error");

	if (len > 0)
		(void)!write(STDERR_FILENO, line, (size_t)len < sizeof(line) ? (size_t)len : sizeof(line) - 1);
	_exit(1);
}

/* A decimal number from `least` to 2^22 (pids and fds both fit). */
static int number(const char *text, long least)
{
	char *end;
	long value;

	errno = 0;
	value = strtol(text, &end, 10);
	if (errno || end == text || *end || value < least || value > 1 << 22) {
		errno = EINVAL;
		fail("usage: warden CHILD FILTER_FD");
	}
	return (int)value;
}

static void load_filter(int fd)
{
	size_t size = 0;
	ssize_t got;
	struct sock_fprog prog;

	while ((got = read(fd, (char *)program + size, sizeof(program) - size)) > 0)
		size += (size_t)got;
	if (got < 0)
		fail("read the filter");
	if (size == 0 || size == sizeof(program) || size % sizeof(program[0])) {
		errno = EINVAL;
		fail("the filter is not a BPF program");
	}
	close(fd);
	prog.len = (unsigned short)(size / sizeof(program[0]));
	prog.filter = program;
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0)
		fail("load the filter");
}

/* Signal dispositions and the mask survive exec: a SIGCHLD ignored by whoever started us
 * would let the kernel reap the device unseen (waitpid: ECHILD), and a blocked signal would
 * leave the device's death pending in us instead of ending us. Both to the defaults. */
static void default_signals(void)
{
	/* and what `ctl crash-device` sends (protocol/spec.py CRASH_SIGNALS): one inherited
	 * ignored (`trap '' ABRT` in the script that started the VM) would let us outlive the
	 * crash the monitor counts on (slot.crash refuses to signal us twice) */
	static const int to_default[] = { SIGCHLD, SIGSEGV, SIGABRT, SIGTERM, SIGBUS, SIGILL, SIGFPE };
	sigset_t none;
	size_t i;

	if (sigemptyset(&none) < 0 || sigprocmask(SIG_SETMASK, &none, NULL) < 0)
		fail("unblock signals");
	for (i = 0; i < sizeof(to_default) / sizeof(to_default[0]); i++)
		if (signal(to_default[i], SIG_DFL) == SIG_ERR)
			fail("a signal to its default");
}

int main(int argc, char **argv)
{
	pid_t child;
	int status;

	if (argc != 3) {
		errno = EINVAL;
		fail("usage: warden CHILD FILTER_FD");
	}
	child = number(argv[1], 1); /* 0 would make waitpid wait for any child of the group */
	if (prctl(PR_SET_DUMPABLE, 0) < 0)
		fail("PR_SET_DUMPABLE");
	default_signals();
	load_filter(number(argv[2], 0)); /* fd 0 as often as not: stdin was closed for it */
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR)
			fail("wait for the device");
	if (WIFSIGNALED(status)) {
		int sig = WTERMSIG(status);

		/* The same death: default action (SIGPIPE and SIGXFSZ come ignored from Python). */
		signal(sig, SIG_DFL);
		kill(getpid(), sig);
	}
	_exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
}
