/*
 * Case 11, a peer process that ends without closing:
 *  - a child process connects, writes 1 MiB and calls _exit(0) without closing
 *    (no destructors, no atexit): the kernel closes its socket, so the server
 *    reads every byte, then end of stream (a FIN, not a reset);
 *  - then the client's own process connects, writes "bye" and closes (so that it,
 *    too, ran vmc and writes its report).
 */
#include "common.c"
#include <sys/wait.h>

#define BYTES (1024 * 1024)
#define FIRST 65536

static void server(void) {
    int l = listener();
    int c = take(l);
    static unsigned char buf[65536];
    uint64_t total = 0, h = FNV_INIT;
    long n;
    /* A first chunk, and a round trip, before the rest (time to attach). */
    read_exact(c, buf, FIRST);
    h = fnv(h, buf, FIRST);
    total = FIRST;
    ctl_send("more");
    for (;;) {
        n = read(c, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        h = fnv(h, buf, (size_t)n);
        total += (uint64_t)n;
    }
    T("read total=%llu sum_ok=%s end=%s", (unsigned long long)total,
      yesno(h == pat_sum(5, BYTES)), n == 0 ? "EOF" : ename(errno));
    R(close(c), "close");
    c = take(l);
    char b[8];
    RD(read(c, b, sizeof b), b, "read(second)");
    RD(read(c, b, sizeof b), b, "read(second) at EOF");
    R(close(c), "close(second)");
    R(close(l), "close listener");
}

static void client(void) {
    pid_t kid = fork();
    if (kid == 0) {
        int s = dial();
        static unsigned char buf[BYTES];
        fill_pat(5, 0, buf, BYTES);
        write_all(s, buf, FIRST);
        ctl_expect("more");
        write_all(s, buf + FIRST, BYTES - FIRST);
        _exit(0);
    }
    int st = 0;
    MUST(waitpid(kid, &st, 0));
    T("child exited status=%d", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    int s = dial();
    write_all(s, "bye", 3);
    R(close(s), "close(second)");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
