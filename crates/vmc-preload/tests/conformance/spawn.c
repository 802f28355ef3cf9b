/*
 * Case 12, spawning a child the way language runtimes do (CPython's
 * subprocess, asyncio's child watchers, posix_spawn): vfork, then in the
 * child, which shares the parent's memory until it execs, every signal
 * handler reset to SIG_DFL and every descriptor above 2 closed.
 *  - the parent waits for SIGCHLD in poll on a self-pipe that its handler
 *    writes (the wake-up descriptor of an event loop): the handler must run
 *    and the pipe must become readable (under a preload whose signal or
 *    descriptor tables the child could overwrite, the parent hangs);
 *  - the parent's connection, idle during the spawn, still carries data both
 *    ways afterwards (the child's close_range must not take it from the
 *    parent), and the child's exit status is seen;
 *  - a second round through posix_spawn (glibc's is a vfork too).
 * The parent polls until the pipe is readable: whether a given poll returned
 * EINTR first depends on timing, so it is not printed.
 */
#include "common.c"
#include <spawn.h>
#include <sys/syscall.h>

extern char **environ;

static int pipe_[2];

static void on_chld(int s) {
    (void)s;
    int saved = errno;
    if (write(pipe_[1], "x", 1) < 0) {
    }
    errno = saved;
}

/* Waits until the self-pipe is readable, through EINTR, and drains it. */
static void wait_for_child_signal(int conn) {
    for (;;) {
        struct pollfd p[2] = {{pipe_[0], POLLIN, 0}, {conn, POLLIN, 0}};
        int r = poll(p, 2, 10000);
        if (r < 0 && errno == EINTR) continue;
        if (r == 0) {
            T("no SIGCHLD within 10 s");
            return;
        }
        if (r < 0) die("poll");
        if (p[1].revents) T("connection unexpectedly ready: %s", pollbits(p[1].revents));
        if (p[0].revents & POLLIN) break;
    }
    char b[16];
    while (read(pipe_[0], b, sizeof b) > 0) {
    }
    T("SIGCHLD handler ran, pipe readable");
}

static void reap(const char *how, pid_t kid) {
    int st = 0;
    pid_t w;
    while ((w = waitpid(kid, &st, 0)) < 0 && errno == EINTR) {
    }
    T("%s child exited=%s status=%d", how, yesno(w == kid && WIFEXITED(st)),
      WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

static void round_trip(int s, const char *msg) {
    char b[8];
    write_all(s, msg, 4);
    read_exact(s, b, 4);
    T("echo %s", show(b, 4));
}

static void server(void) {
    int l = listener();
    int c = take(l);
    char b[4];
    for (int i = 0; i < 3; i++) {
        read_exact(c, b, 4);
        write_all(c, b, 4);
    }
    T("stream sum_ok=%s", yesno(drain_exact(c, 1 << 20) == pat_sum(12, 1 << 20)));
    char e;
    R(read(c, &e, 1), "read at EOF");
    R(close(c), "close");
    R(close(l), "close listener");
}

static void client(void) {
    int s = dial();
    round_trip(s, "one!");

    MUST(pipe2(pipe_, O_CLOEXEC | O_NONBLOCK));
    struct sigaction sa = {0};
    sa.sa_handler = on_chld;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    MUST(sigaction(SIGCHLD, &sa, NULL));

    pid_t kid = vfork();
    if (kid == 0) {
        /* What CPython's _posixsubprocess does between vfork and exec. */
        struct sigaction dfl = {0};
        dfl.sa_handler = SIG_DFL;
        for (int sig = 1; sig < NSIG; sig++) {
            struct sigaction cur;
            if (sigaction(sig, NULL, &cur) == 0 && cur.sa_handler != SIG_DFL &&
                cur.sa_handler != SIG_IGN)
                sigaction(sig, &dfl, NULL);
        }
        close_range(3, ~0U, 0);
        char *argv[] = {"true", NULL};
        execve("/bin/true", argv, environ);
        _exit(127);
    }
    if (kid < 0) die("vfork");
    wait_for_child_signal(s);
    reap("vfork", kid);
    struct sigaction now;
    MUST(sigaction(SIGCHLD, NULL, &now));
    T("SIGCHLD handler still ours=%s", yesno(now.sa_handler == on_chld));
    round_trip(s, "two!");

    char *argv[] = {"true", NULL};
    pid_t kid2;
    int r = posix_spawn(&kid2, "/bin/true", NULL, NULL, argv, environ);
    T("posix_spawn = %d", r);
    if (r == 0) {
        wait_for_child_signal(s);
        reap("posix_spawn", kid2);
    }
    round_trip(s, "3ree");

    static unsigned char buf[1 << 20];
    fill_pat(12, 0, buf, sizeof buf);
    write_all(s, buf, sizeof buf);
    R(close(s), "close");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
