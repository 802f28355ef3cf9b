/*
 * Case 6, fork:
 *  A. parent and child both read 4-byte numbered records from one connection
 *     while the peer writes them in order; the union of what they read is
 *     every record exactly once, and each reader saw increasing numbers. Who
 *     got which is not printed.
 *  B. the child only closes its copy and exits; the parent's connection works.
 *     (1 MiB goes first, before the fork: the connection is on the rings by
 *     then, so this part is accelerated however loaded the machine; A and C
 *     fork at once, maybe mid-handshake, and may end up on TCP.)
 *  C. the child writes, exits; then the parent writes: the peer reads both,
 *     in that order.
 * Children exit with exit() (not _exit), as ordinary programs do.
 */
#include "common.c"

#define RECORDS 10000
/* What B's client sends before the fork. */
#define WARM (1 << 20)

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Reads records until EOF into out; returns the count, or -1 on a short
 * read or an error. Sets *increasing. */
static long read_records(int fd, uint32_t *out, int *increasing) {
    long n = 0;
    *increasing = 1;
    for (;;) {
        unsigned char b[4];
        ssize_t r = read(fd, b, 4);
        if (r < 0 && errno == EINTR) continue;
        if (r == 0) return n;
        if (r != 4) {
            /* stderr is not part of the trace: what went wrong, for the log */
            fprintf(stderr, "read_records: read returned %zd (%s) after %ld records\n", r,
                    r < 0 ? ename(errno) : "short", n);
            return -1;
        }
        uint32_t v = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
        if (n > 0 && v <= out[n - 1]) *increasing = 0;
        if (n >= RECORDS) return -1;
        out[n++] = v;
    }
}

static void wait_child(pid_t pid, const char *what) {
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    T("%s: exited=%s status=%d", what, yesno(WIFEXITED(st)), WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st));
}

static void server(void) {
    int l = listener();
    char buf[64];

    /* A */
    int a = take(l);
    int p[2];
    MUST(pipe(p));
    static uint32_t mine[RECORDS], theirs[RECORDS], all[2 * RECORDS];
    pid_t pid = fork();
    MUST(pid);
    if (pid == 0) {
        close(p[0]);
        int inc;
        long n = read_records(a, theirs, &inc);
        long hdr[2] = {n, inc};
        write_all(p[1], hdr, sizeof hdr);
        if (n > 0) write_all(p[1], theirs, (size_t)n * 4);
        exit(0);
    }
    close(p[1]);
    ctl_send("forked");
    int inc_mine, inc_theirs;
    long n_mine = read_records(a, mine, &inc_mine);
    long hdr[2];
    read_exact(p[0], hdr, sizeof hdr);
    long n_theirs = hdr[0];
    inc_theirs = (int)hdr[1];
    if (n_theirs > 0) read_exact(p[0], theirs, (size_t)n_theirs * 4);
    close(p[0]);
    wait_child(pid, "A: reader child");
    T("A: parent read whole records=%s increasing=%s", yesno(n_mine >= 0), yesno(inc_mine));
    T("A: child read whole records=%s increasing=%s", yesno(n_theirs >= 0), yesno(inc_theirs));
    long total = 0;
    for (long i = 0; i < n_mine; i++) all[total++] = mine[i];
    for (long i = 0; i < n_theirs; i++) all[total++] = theirs[i];
    qsort(all, (size_t)total, 4, cmp_u32);
    int exact = total == RECORDS;
    for (long i = 0; exact && i < total; i++) exact = all[i] == (uint32_t)i;
    uint64_t h = fnv(FNV_INIT, all, (size_t)total * 4);
    T("A: union count=%ld every_record_once=%s first=%u last=%u sum=%016llx", total, yesno(exact),
      total ? all[0] : 0, total ? all[total - 1] : 0, (unsigned long long)h);
    R(write(a, "ok", 2), "A: write(ok)");
    R(close(a), "A: close");

    /* B */
    int b = take(l);
    uint64_t hb = drain_exact(b, WARM);
    T("B: read %d bytes ok=%s", WARM, yesno(hb == pat_sum(3, WARM)));
    pid = fork();
    MUST(pid);
    if (pid == 0) {
        int r = close(b);
        exit(r == 0 ? 0 : 1);
    }
    wait_child(pid, "B: closing child");
    ctl_send("child-gone");
    RD(read(b, buf, 4), buf, "B: read(4)");
    R(write(b, "pong", 4), "B: write(pong)");
    RD(read(b, buf, sizeof buf), buf, "B: read at EOF");
    R(close(b), "B: close");

    /* C */
    int c = take(l);
    pid = fork();
    MUST(pid);
    if (pid == 0) {
        ssize_t w = write(c, "from-child;", 11);
        exit(w == 11 ? 0 : 1);
    }
    wait_child(pid, "C: writing child");
    R(write(c, "from-parent", 11), "C: write(from-parent)");
    R(shutdown(c, SHUT_WR), "C: shutdown(SHUT_WR)");
    RD(read(c, buf, sizeof buf), buf, "C: read at EOF");
    R(close(c), "C: close");
    R(close(l), "close listener");
}

static void client(void) {
    char buf[64];

    int a = dial();
    ctl_expect("forked");
    for (uint32_t i = 0; i < RECORDS; i++) {
        unsigned char rec[4] = {(unsigned char)(i >> 24), (unsigned char)(i >> 16), (unsigned char)(i >> 8),
                                (unsigned char)i};
        write_all(a, rec, 4);
    }
    T("A: wrote %d records", RECORDS);
    R(shutdown(a, SHUT_WR), "A: shutdown(SHUT_WR)");
    RD(recv(a, buf, 2, MSG_WAITALL), buf, "A: read(2)");
    RD(read(a, buf, sizeof buf), buf, "A: read at EOF");
    R(close(a), "A: close");

    int b = dial();
    static unsigned char warm[WARM];
    fill_pat(3, 0, warm, WARM);
    write_all(b, warm, WARM);
    ctl_expect("child-gone");
    R(write(b, "ping", 4), "B: write(ping)");
    RD(recv(b, buf, 4, MSG_WAITALL), buf, "B: read(4)");
    R(shutdown(b, SHUT_WR), "B: shutdown(SHUT_WR)");
    RD(read(b, buf, sizeof buf), buf, "B: read at EOF");
    R(close(b), "B: close");

    int c = dial();
    RD(recv(c, buf, 22, MSG_WAITALL), buf, "C: recv(22, WAITALL)");
    RD(read(c, buf, sizeof buf), buf, "C: read at EOF");
    R(close(c), "C: close");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
