/*
 * Case 4, epoll: level-triggered EPOLLIN repeats until drained; EPOLLET
 * reports once per arrival; EPOLLIN|EPOLLOUT|EPOLLET (the nginx registration)
 * reports IN|OUT on an arrival; EPOLLONESHOT and re-arming with MOD; DEL and
 * the errors of ctl; one socket in two sets; nested epoll (and poll on an
 * epoll descriptor); a pipe in the same
 * set; blocking waits woken by the peer or the pipe; epoll_pwait/epoll_pwait2
 * timeouts; EPOLLOUT|EPOLLET with a full send side (exactly one new edge once
 * the peer drained it); EPOLLRDHUP; EPOLLHUP; close removes registrations.
 *
 * Registrations carry a tag in data.u64: 1 the connection, 2 the pipe, 3 an
 * inner epoll fd. Events are printed sorted by tag.
 */
#include "common.c"

enum { CONN = 1, PIPE = 2, INNER = 3 };
static int conn_, pipe_r_, pipe_w_;

static int add(int ep, int fd, uint32_t events, uint64_t tag, const char *what) {
    struct epoll_event ev = {0};
    ev.events = events;
    ev.data.u64 = tag;
    return (int)R(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev), "epoll_ctl(ADD, %s)", what);
}

static int mod(int ep, int fd, uint32_t events, uint64_t tag, const char *what) {
    struct epoll_event ev = {0};
    ev.events = events;
    ev.data.u64 = tag;
    return (int)R(epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev), "epoll_ctl(MOD, %s)", what);
}

static int wait_(int ep, int timeout, const char *what) {
    struct epoll_event ev[8];
    char w[128];
    snprintf(w, sizeof w, "%s: epoll_wait(%d)", what, timeout);
    return E(w, ev, epoll_wait(ep, ev, 8, timeout));
}

/* Writes the pipe once thread `arg` (a tid) blocks in its wait. */
static void *poke_pipe(void *arg) {
    wait_asleep((pid_t)(intptr_t)arg);
    if (write(pipe_w_, "p", 1) != 1) die("poke_pipe");
    return NULL;
}

/* Writes 64 KiB chunks until EAGAIN; returns the total written. */
static unsigned long long fill(int fd, unsigned seed) {
    static unsigned char chunk[65536];
    unsigned long long total = 0;
    for (;;) {
        fill_pat(seed, total, chunk, sizeof chunk);
        ssize_t w = write(fd, chunk, sizeof chunk);
        if (w < 0) {
            T("fill: write until error: %s after_some_bytes=%s", ename(errno), yesno(total > 0));
            return total;
        }
        total += (unsigned long long)w;
    }
}

/* Asks the peer for n bytes and waits until they were sent. */
static void ask(int n) {
    ctl_send("send %d", n);
    ctl_expect("sent");
}

static void server(void) {
    int l = listener();
    char buf[64];
    int p[2];
    MUST(pipe(p));
    pipe_r_ = p[0];
    pipe_w_ = p[1];
    conn_ = take(l);

    /* level-triggered */
    int lt = (int)RFD(epoll_create1(EPOLL_CLOEXEC), "epoll_create1");
    add(lt, conn_, EPOLLIN, CONN, "conn, IN");
    add(lt, conn_, EPOLLIN, CONN, "conn, IN again");
    wait_(lt, 0, "LT idle");
    ask(10);
    wait_(lt, -1, "LT data");
    wait_(lt, 0, "LT data again");
    RD(read(conn_, buf, 4), buf, "read(4)");
    wait_(lt, 0, "LT partly read");
    RD(read(conn_, buf, 6), buf, "read(6)");
    wait_(lt, 0, "LT drained");

    /* edge-triggered, IN only */
    int et = (int)RFD(epoll_create1(0), "epoll_create1");
    add(et, conn_, EPOLLIN | EPOLLET, CONN, "conn, IN|ET");
    wait_(et, 0, "ET idle");
    ask(10);
    wait_(et, -1, "ET data");
    wait_(et, 0, "ET same data");
    RD(read(conn_, buf, 4), buf, "read(4)");
    wait_(et, 0, "ET partly read");
    ask(5);
    wait_(et, -1, "ET more data");
    wait_(et, 0, "ET same data");
    RD(read(conn_, buf, 11), buf, "read(11)");
    wait_(et, 0, "ET drained");
    R(close(et), "close(ET epoll)");

    /* edge-triggered IN|OUT|RDHUP: what nginx registers */
    int ng = (int)RFD(epoll_create1(0), "epoll_create1");
    add(ng, conn_, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, CONN, "conn, IN|OUT|RDHUP|ET");
    wait_(ng, 0, "IN|OUT|ET fresh");
    wait_(ng, 0, "IN|OUT|ET again");
    ask(3);
    wait_(ng, -1, "IN|OUT|ET data");
    wait_(ng, 0, "IN|OUT|ET same data");
    RD(read(conn_, buf, 3), buf, "read(3)");
    R(write(conn_, "k", 1), "write(k)");
    ctl_send("read 1");
    ctl_expect("read");
    wait_(ng, 0, "IN|OUT|ET after own write");
    R(close(ng), "close(nginx epoll)");

    /* one-shot */
    int os = (int)RFD(epoll_create1(0), "epoll_create1");
    add(os, conn_, EPOLLIN | EPOLLONESHOT, CONN, "conn, IN|ONESHOT");
    ask(2);
    wait_(os, -1, "ONESHOT data");
    wait_(os, 0, "ONESHOT fired");
    ask(2);
    wait_(os, 0, "ONESHOT more data, disarmed");
    mod(os, conn_, EPOLLIN | EPOLLONESHOT, CONN, "conn, IN|ONESHOT re-arm");
    wait_(os, 0, "ONESHOT re-armed with data");
    wait_(os, 0, "ONESHOT fired again");
    RD(read(conn_, buf, 4), buf, "read(4)");
    mod(os, conn_, EPOLLIN | EPOLLONESHOT, CONN, "conn, IN|ONESHOT re-arm, no data");
    wait_(os, 0, "ONESHOT armed, idle");
    ask(1);
    wait_(os, -1, "ONESHOT data");
    RD(read(conn_, buf, 1), buf, "read(1)");

    /* DEL and the errors of ctl */
    R(epoll_ctl(os, EPOLL_CTL_DEL, conn_, NULL), "epoll_ctl(DEL)");
    R(epoll_ctl(os, EPOLL_CTL_DEL, conn_, NULL), "epoll_ctl(DEL) again");
    mod(os, conn_, EPOLLIN, CONN, "conn after DEL");
    add(os, os, EPOLLIN, 9, "epoll fd into itself");
    ask(1);
    {
        struct pollfd q = {conn_, POLLIN, 0};
        long n = poll(&q, 1, -1);
        Re(n, errno, "poll(IN, -1) revents=%s", pollbits(q.revents));
    }
    wait_(os, 0, "after DEL, data");
    RD(read(conn_, buf, 1), buf, "read(1)");
    R(close(os), "close(one-shot epoll)");

    /* the same socket in two sets, one LT (lt) one ET */
    int e2 = (int)RFD(epoll_create1(0), "epoll_create1");
    add(e2, conn_, EPOLLIN | EPOLLET, CONN, "conn, IN|ET in a second set");
    ask(1);
    wait_(lt, -1, "two sets: LT");
    wait_(e2, -1, "two sets: ET");
    wait_(e2, 0, "two sets: ET again");
    wait_(lt, 0, "two sets: LT again");
    RD(read(conn_, buf, 1), buf, "read(1)");
    wait_(lt, 0, "two sets: LT drained");
    wait_(e2, 0, "two sets: ET drained");
    R(close(e2), "close(second set)");

    /* nested: an outer epoll watching the LT set */
    int outer = (int)RFD(epoll_create1(0), "epoll_create1");
    add(outer, lt, EPOLLIN, INNER, "inner LT epoll fd, IN");
    add(lt, outer, EPOLLIN, INNER, "outer epoll fd into the inner one (a loop)");
    int oet = (int)RFD(epoll_create1(0), "epoll_create1");
    add(oet, lt, EPOLLIN | EPOLLET, INNER, "inner LT epoll fd, IN|ET");
    wait_(outer, 0, "nested idle");
    wait_(oet, 0, "nested ET idle");
    struct pollfd pe = {lt, POLLIN, 0};
    long pr = poll(&pe, 1, 0);
    Re(pr, errno, "poll(inner epoll fd, 0) idle revents=%s", pollbits(pe.revents));
    ask(1);
    wait_(outer, -1, "nested data");
    pe.revents = 0;
    pr = poll(&pe, 1, -1);
    Re(pr, errno, "poll(inner epoll fd, -1) revents=%s", pollbits(pe.revents));
    wait_(oet, 0, "nested ET data");
    wait_(oet, 0, "nested ET data, again");
    ask(1);
    wait_(oet, -1, "nested ET, more data");
    RD(read(conn_, buf, 2), buf, "read(2)");
    wait_(outer, 0, "nested drained");
    R(close(oet), "close(oet)");
    R(close(outer), "close(outer)");

    /* a pipe in the same set; blocking waits woken by the pipe or the peer */
    add(lt, pipe_r_, EPOLLIN, PIPE, "pipe, IN");
    pthread_t t;
    MUST(-pthread_create(&t, NULL, poke_pipe, (void *)(intptr_t)tid_self()));
    wait_(lt, -1, "woken by pipe");
    MUST(-pthread_join(t, NULL));
    RD(read(pipe_r_, buf, 1), buf, "read(pipe)");
    ctl_send("send-later 1");
    wait_(lt, -1, "woken by peer");
    RD(read(conn_, buf, 1), buf, "read(1)");
    if (write(pipe_w_, "p", 1) != 1) die("pipe");
    ask(1);
    wait_(lt, -1, "pipe and peer");
    RD(read(conn_, buf, 1), buf, "read(1)");
    RD(read(pipe_r_, buf, 1), buf, "read(pipe)");

    /* timeouts */
    {
        struct epoll_event ev[4];
        double t0 = now_ms();
        wait_(lt, 50, "timeout");
        T("epoll_wait waited_50ms=%s", yesno(now_ms() - t0 >= 45));
        sigset_t none;
        sigemptyset(&none);
        t0 = now_ms();
        E("epoll_pwait(50)", ev, epoll_pwait(lt, ev, 4, 50, &none));
        T("epoll_pwait waited_50ms=%s", yesno(now_ms() - t0 >= 45));
        struct timespec ts = {0, 50000000L};
        t0 = now_ms();
        E("epoll_pwait2(50ms)", ev, epoll_pwait2(lt, ev, 4, &ts, NULL));
        T("epoll_pwait2 waited_50ms=%s", yesno(now_ms() - t0 >= 45));
        ts.tv_nsec = 0;
        E("epoll_pwait2(0)", ev, epoll_pwait2(lt, ev, 4, &ts, NULL));
    }

    /* EPOLLOUT|EPOLLET with a full send side */
    int fl = fcntl(conn_, F_GETFL);
    MUST(fcntl(conn_, F_SETFL, fl | O_NONBLOCK));
    int wo = (int)RFD(epoll_create1(0), "epoll_create1");
    add(wo, conn_, EPOLLOUT | EPOLLET, CONN, "conn, OUT|ET");
    wait_(wo, 0, "OUT|ET fresh");
    wait_(wo, 0, "OUT|ET again");
    unsigned long long n = fill(conn_, 3);
    wait_(wo, 0, "OUT|ET full");
    ctl_send("drain %llu", n);
    ctl_expect("drained");
    wait_(wo, -1, "OUT|ET drained");
    wait_(wo, 0, "OUT|ET drained, again");
    {
        struct pollfd q = {conn_, POLLOUT, 0};
        long r = poll(&q, 1, 0);
        Re(r, errno, "poll(OUT, 0) revents=%s", pollbits(q.revents));
    }
    wait_(wo, 0, "OUT|ET after poll");
    R(write(conn_, "x", 1), "write(x)");
    ctl_send("read 1");
    ctl_expect("read");
    wait_(wo, 0, "OUT|ET after a small write");
    /* and the same with the nginx registration, where an arrival re-reports OUT */
    n = fill(conn_, 4);
    int ng2 = (int)RFD(epoll_create1(0), "epoll_create1");
    add(ng2, conn_, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, CONN, "conn, IN|OUT|RDHUP|ET when full");
    wait_(ng2, 0, "IN|OUT|ET full");
    ctl_send("drain %llu", n);
    ctl_expect("drained");
    wait_(ng2, -1, "IN|OUT|ET drained");
    wait_(ng2, 0, "IN|OUT|ET drained, again");
    R(close(ng2), "close");
    MUST(fcntl(conn_, F_SETFL, fl));

    /* EPOLLRDHUP when the peer shuts its side down, LT and ET */
    int rh = (int)RFD(epoll_create1(0), "epoll_create1");
    add(rh, conn_, EPOLLIN | EPOLLRDHUP, CONN, "conn, IN|RDHUP");
    wait_(rh, 0, "RDHUP idle");
    ctl_send("shut");
    wait_(rh, -1, "peer SHUT_WR");
    RD(read(conn_, buf, sizeof buf), buf, "read at EOF");
    wait_(rh, 0, "peer SHUT_WR, after EOF");
    int re = (int)RFD(epoll_create1(0), "epoll_create1");
    add(re, conn_, EPOLLIN | EPOLLRDHUP | EPOLLET, CONN, "conn, IN|RDHUP|ET after the FIN");
    wait_(re, 0, "ET after FIN");
    wait_(re, 0, "ET after FIN, again");
    wait_(wo, 0, "OUT|ET after FIN");

    /* EPOLLHUP once both directions are shut down */
    int hu = (int)RFD(epoll_create1(0), "epoll_create1");
    add(hu, conn_, EPOLLIN | EPOLLOUT | EPOLLRDHUP, CONN, "conn, IN|OUT|RDHUP");
    R(shutdown(conn_, SHUT_WR), "shutdown(SHUT_WR)");
    wait_(hu, 0, "both shut");
    wait_(rh, 0, "both shut, IN|RDHUP set");
    wait_(re, 0, "both shut, ET set");
    wait_(wo, 0, "both shut, OUT|ET set");
    ctl_expect("eof");

    /* close removes the socket from every set */
    R(close(conn_), "close(conn)");
    wait_(hu, 0, "after close");
    wait_(rh, 0, "after close");
    wait_(lt, 0, "after close (pipe still in)");
    R(close(hu), "close");
    R(close(rh), "close");
    R(close(re), "close");
    R(close(wo), "close");
    R(close(lt), "close");
    R(close(l), "close listener");
    R(close(pipe_r_), "close pipe");
    R(close(pipe_w_), "close pipe");
}

static void client(void) {
    char buf[256];
    int s = dial();
    unsigned char data[64];
    fill_pat(0, 0, data, sizeof data);
    int k = 0;
    for (;;) {
        ctl_recv(buf, sizeof buf);
        int n;
        if (sscanf(buf, "send %d", &n) == 1) {
            R(write(s, data + k, (size_t)n), "write(%d)", n);
            k = (k + n) % 32;
            ctl_send("sent");
        } else if (sscanf(buf, "send-later %d", &n) == 1) {
            R(write(s, data + k, (size_t)n), "write(%d) later", n);
            k = (k + n) % 32;
        } else if (sscanf(buf, "read %d", &n) == 1) {
            RD(read(s, buf, (size_t)n), buf, "read(%d)", n);
            ctl_send("read");
        } else if (strncmp(buf, "drain ", 6) == 0) {
            unsigned long long m = strtoull(buf + 6, NULL, 10);
            uint64_t h = drain_exact(s, m);
            T("drained: sum_ok=%s", yesno(h == pat_sum(3, m) || h == pat_sum(4, m)));
            ctl_send("drained");
        } else if (strcmp(buf, "shut") == 0) {
            R(shutdown(s, SHUT_WR), "shutdown(SHUT_WR)");
            break;
        } else {
            die("unknown command %s", buf);
        }
    }
    RD(read(s, buf, sizeof buf), buf, "read at EOF");
    ctl_send("eof");
    R(close(s), "close");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
