/*
 * Case 3, poll/ppoll/select/pselect: readiness before and after data, with a
 * pipe in the same call, blocking waits woken by either, timeouts, after the
 * peer shut down its sending side (POLLRDHUP), after the peer closed and
 * reset, after both directions were shut down (POLLHUP), and a closed fd.
 */
#include "common.c"

static int conn_, pipe_r_, pipe_w_;
static const char *const names_[] = {"conn", "pipe"};

/* Every call with timeout 0 (or the one given) on {conn, pipe}: poll and
 * ppoll with IN|PRI|OUT|RDHUP on the connection and IN on the pipe; select
 * and pselect with the connection in all three sets and the pipe readable. */
static void snapshot(const char *label, int timeout_ms) {
    struct pollfd p[2] = {{conn_, POLLIN | POLLPRI | POLLOUT | POLLRDHUP, 0}, {pipe_r_, POLLIN, 0}};
    char what[128];
    snprintf(what, sizeof what, "%s: poll", label);
    P(what, p, 2, names_, poll(p, 2, timeout_ms));

    struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    p[0].revents = p[1].revents = 0;
    snprintf(what, sizeof what, "%s: ppoll", label);
    P(what, p, 2, names_, ppoll(p, 2, &ts, NULL));

    for (int variant = 0; variant < 2; variant++) {
        fd_set r, w, x;
        FD_ZERO(&r);
        FD_ZERO(&w);
        FD_ZERO(&x);
        FD_SET(conn_, &r);
        FD_SET(conn_, &w);
        FD_SET(conn_, &x);
        FD_SET(pipe_r_, &r);
        int nfds = (conn_ > pipe_r_ ? conn_ : pipe_r_) + 1;
        long n;
        int e;
        if (variant == 0) {
            struct timeval tv = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000L};
            n = select(nfds, &r, &w, &x, &tv);
            e = errno;
        } else {
            sigset_t none;
            sigemptyset(&none);
            n = pselect(nfds, &r, &w, &x, &ts, &none);
            e = errno;
        }
        Re(n, e, "%s: %s conn:%s%s%s pipe:%s", label, variant ? "pselect" : "select",
           FD_ISSET(conn_, &r) ? "r" : "-", FD_ISSET(conn_, &w) ? "w" : "-", FD_ISSET(conn_, &x) ? "x" : "-",
           FD_ISSET(pipe_r_, &r) ? "r" : "-");
    }
}

/* Writes the pipe once thread `arg` (a tid) blocks in its wait. */
static void *poke_pipe(void *arg) {
    wait_asleep((pid_t)(intptr_t)arg);
    if (write(pipe_w_, "p", 1) != 1) die("poke_pipe");
    return NULL;
}

static void drain_pipe(void) {
    char b;
    read_exact(pipe_r_, &b, 1);
}

/* Blocks in poll(-1) and select(NULL) until something is ready; the wake-up
 * comes from the other role or from a thread writing the pipe. */
static void wait_poll(const char *label) {
    struct pollfd p[2] = {{conn_, POLLIN, 0}, {pipe_r_, POLLIN, 0}};
    P(label, p, 2, names_, poll(p, 2, -1));
}

static void wait_select(const char *label) {
    fd_set r;
    FD_ZERO(&r);
    FD_SET(conn_, &r);
    FD_SET(pipe_r_, &r);
    int nfds = (conn_ > pipe_r_ ? conn_ : pipe_r_) + 1;
    long n = select(nfds, &r, NULL, NULL, NULL);
    Re(n, errno, "%s conn:%s pipe:%s", label, FD_ISSET(conn_, &r) ? "r" : "-", FD_ISSET(pipe_r_, &r) ? "r" : "-");
}

static void server(void) {
    int l = listener();
    char buf[64];
    int p[2];
    MUST(pipe(p));
    pipe_r_ = p[0];
    pipe_w_ = p[1];
    conn_ = take(l);

    snapshot("idle", 0);

    /* timeouts with nothing ready */
    {
        struct pollfd q[2] = {{conn_, POLLIN | POLLRDHUP, 0}, {pipe_r_, POLLIN, 0}};
        double t0 = now_ms();
        P("poll(IN, 50ms)", q, 2, names_, poll(q, 2, 50));
        T("poll waited_50ms=%s", yesno(now_ms() - t0 >= 45));
        struct timespec ts = {0, 50000000L};
        t0 = now_ms();
        P("ppoll(IN, 50ms)", q, 2, names_, ppoll(q, 2, &ts, NULL));
        T("ppoll waited_50ms=%s", yesno(now_ms() - t0 >= 45));
        fd_set r;
        FD_ZERO(&r);
        FD_SET(conn_, &r);
        FD_SET(pipe_r_, &r);
        struct timeval tv = {0, 50000};
        int nfds = (conn_ > pipe_r_ ? conn_ : pipe_r_) + 1;
        t0 = now_ms();
        long n = select(nfds, &r, NULL, NULL, &tv);
        Re(n, errno, "select(r, 50ms) conn:%s pipe:%s tv_left=%ld.%06ld", FD_ISSET(conn_, &r) ? "r" : "-",
           FD_ISSET(pipe_r_, &r) ? "r" : "-", (long)tv.tv_sec, (long)tv.tv_usec);
        T("select waited_50ms=%s", yesno(now_ms() - t0 >= 45));
        FD_SET(conn_, &r);
        t0 = now_ms();
        n = pselect(nfds, &r, NULL, NULL, &ts, NULL);
        Re(n, errno, "pselect(r, 50ms) conn:%s", FD_ISSET(conn_, &r) ? "r" : "-");
        T("pselect waited_50ms=%s", yesno(now_ms() - t0 >= 45));
    }

    /* data from the peer */
    ctl_send("send");
    ctl_expect("sent");
    {
        struct pollfd q = {conn_, POLLIN, 0};
        long n = poll(&q, 1, -1);
        Re(n, errno, "poll(IN, -1) revents=%s", pollbits(q.revents));
    }
    snapshot("data", 0);
    if (write(pipe_w_, "p", 1) != 1) die("pipe");
    snapshot("data+pipe", 0);
    RD(read(conn_, buf, 3), buf, "read(3)");
    snapshot("pipe only", 0);
    drain_pipe();
    snapshot("drained", 0);

    /* blocking waits, woken by the pipe (a thread writes it) ... */
    pthread_t t;
    MUST(-pthread_create(&t, NULL, poke_pipe, (void *)(intptr_t)tid_self()));
    wait_poll("poll(-1) woken by pipe");
    MUST(-pthread_join(t, NULL));
    drain_pipe();
    MUST(-pthread_create(&t, NULL, poke_pipe, (void *)(intptr_t)tid_self()));
    wait_select("select(NULL) woken by pipe");
    MUST(-pthread_join(t, NULL));
    drain_pipe();

    /* ... and by the peer */
    ctl_send("wait1");
    wait_poll("poll(-1) woken by peer");
    RD(read(conn_, buf, 1), buf, "read(1)");
    ctl_send("wait2");
    wait_select("select(NULL) woken by peer");
    RD(read(conn_, buf, 1), buf, "read(1)");
    {
        struct pollfd q = {conn_, POLLIN, 0};
        struct timespec ts = {5, 0};
        sigset_t none;
        sigemptyset(&none);
        ctl_send("wait3");
        long n = ppoll(&q, 1, &ts, &none);
        Re(n, errno, "ppoll(5s) woken by peer revents=%s", pollbits(q.revents));
        RD(read(conn_, buf, 1), buf, "read(1)");
    }

    /* the peer shuts its sending side down */
    ctl_send("shut");
    {
        struct pollfd q = {conn_, POLLRDHUP, 0};
        long n = poll(&q, 1, -1);
        Re(n, errno, "poll(RDHUP, -1) revents=%s", pollbits(q.revents));
    }
    snapshot("peer SHUT_WR", 0);
    RD(read(conn_, buf, sizeof buf), buf, "read at EOF");
    snapshot("after EOF", 0);

    /* the peer closes; our write makes it answer with a reset */
    ctl_send("close");
    ctl_expect("closed");
    snapshot("peer closed", 0);
    R(send(conn_, "z", 1, MSG_NOSIGNAL), "send(z)");
    {
        /* wait for the reset (bounded: a missing one is a difference, not a hang) */
        struct pollfd q = {conn_, 0, 0};
        long n = poll(&q, 1, 5000);
        Re(n, errno, "poll(0, 5s) revents=%s", pollbits(q.revents));
    }
    snapshot("reset", 0);
    RD(read(conn_, buf, sizeof buf), buf, "read after reset");
    int v = -1;
    socklen_t vl = sizeof v;
    long r = getsockopt(conn_, SOL_SOCKET, SO_ERROR, &v, &vl);
    Re(r, errno, "getsockopt(SO_ERROR) val=%s", v ? ename(v) : "0");
    snapshot("error consumed", 0);
    R(send(conn_, "z", 1, MSG_NOSIGNAL), "send(z)");

    /* a closed descriptor (a high number, which no other thread can reuse) */
    {
        int old = 900;
        MUST(dup2(conn_, old));
        R(close(old), "close(dup)");
        struct pollfd q = {old, POLLIN, 0};
        long n = poll(&q, 1, 0);
        Re(n, errno, "poll(closed fd) revents=%s", pollbits(q.revents));
        fd_set rs;
        FD_ZERO(&rs);
        FD_SET(old, &rs);
        struct timeval tv = {0, 0};
        R(select(old + 1, &rs, NULL, NULL, &tv), "select(closed fd)");
    }
    R(close(conn_), "close");

    /* second connection: both directions shut down in order, no reset */
    conn_ = take(l);
    ctl_send("shut2");
    RD(read(conn_, buf, sizeof buf), buf, "read at EOF");
    snapshot("peer SHUT_WR", 0);
    R(shutdown(conn_, SHUT_WR), "shutdown(SHUT_WR)");
    snapshot("both shut", 0);
    ctl_expect("done");
    R(close(conn_), "close");
    R(close(l), "close listener");
    R(close(pipe_r_), "close pipe");
    R(close(pipe_w_), "close pipe");
}

static void client(void) {
    char buf[64];
    int s = dial();
    ctl_expect("send");
    R(write(s, "abc", 3), "write(abc)");
    ctl_send("sent");
    ctl_expect("wait1");
    R(write(s, "d", 1), "write(d)");
    ctl_expect("wait2");
    R(write(s, "e", 1), "write(e)");
    ctl_expect("wait3");
    R(write(s, "f", 1), "write(f)");
    ctl_expect("shut");
    R(shutdown(s, SHUT_WR), "shutdown(SHUT_WR)");
    ctl_expect("close");
    R(close(s), "close");
    ctl_send("closed");

    s = dial();
    ctl_expect("shut2");
    R(shutdown(s, SHUT_WR), "shutdown(SHUT_WR)");
    RD(read(s, buf, sizeof buf), buf, "read at EOF");
    {
        struct pollfd q = {s, POLLIN | POLLOUT | POLLRDHUP, 0};
        long n = poll(&q, 1, -1);
        Re(n, errno, "poll both shut revents=%s", pollbits(q.revents));
    }
    R(close(s), "close");
    ctl_send("done");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
