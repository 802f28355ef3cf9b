/*
 * Case 2, non-blocking sockets: O_NONBLOCK through fcntl and ioctl(FIONBIO),
 * accept4(SOCK_NONBLOCK), accept on a non-blocking listener, a non-blocking
 * connect (EINPROGRESS, completion by POLLOUT and SO_ERROR), EAGAIN on empty
 * reads, and a send side filled until EAGAIN that becomes writable again once
 * the peer drains it.
 */
#include "common.c"

static void flags(int fd, const char *what) {
    int fl = fcntl(fd, F_GETFL);
    T("%s: F_GETFL nonblock=%s", what, fl < 0 ? ename(errno) : yesno(fl & O_NONBLOCK));
}

/* Writes 64 KiB chunks until EAGAIN; returns the total written. Prints only
 * that EAGAIN came (how much fitted depends on buffer sizes). */
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

static void server(void) {
    int l = listener();
    char buf[64];
    R(fcntl(l, F_SETFL, fcntl(l, F_GETFL) | O_NONBLOCK), "listener F_SETFL(O_NONBLOCK)");
    flags(l, "listener");
    RFD(accept4(l, NULL, NULL, SOCK_NONBLOCK), "accept4(NONBLOCK) on empty listener");
    RFD(accept(l, NULL, NULL), "accept on empty listener");
    ctl_send("ready");

    struct pollfd pl = {l, POLLIN, 0};
    long r = poll(&pl, 1, -1);
    Re(r, errno, "poll(listener, IN) revents=%s", pollbits(pl.revents));
    int c = (int)RFD(accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC), "accept4(NONBLOCK|CLOEXEC)");
    nodelay(c);
    flags(c, "accepted");
    T("accepted: F_GETFD cloexec=%s", yesno(fcntl(c, F_GETFD) & FD_CLOEXEC));
    RFD(accept4(l, NULL, NULL, SOCK_NONBLOCK), "accept4 again");

    /* A second connection: accept() does not pass the listener's O_NONBLOCK on. */
    ctl_send("dial2");
    r = poll(&pl, 1, -1);
    Re(r, errno, "poll(listener, IN) revents=%s", pollbits(pl.revents));
    int c2 = (int)RFD(accept(l, NULL, NULL), "accept");
    flags(c2, "accepted by accept()");
    R(close(c2), "close");

    RD(read(c, buf, sizeof buf), buf, "read on empty");
    RD(recv(c, buf, sizeof buf, 0), buf, "recv on empty");
    ctl_send("empty-checked");

    ctl_expect("pinged");
    struct pollfd pc = {c, POLLIN, 0};
    r = poll(&pc, 1, -1);
    Re(r, errno, "poll(IN) revents=%s", pollbits(pc.revents));
    RD(read(c, buf, sizeof buf), buf, "read");
    RD(read(c, buf, sizeof buf), buf, "read again");
    ctl_send("ping-read");

    /* The peer fills its send side; we drain exactly what it wrote. */
    unsigned long long n = ctl_expect_num("drain");
    uint64_t h = drain_exact(c, n);
    T("drained: sum_ok=%s", yesno(h == pat_sum(7, n)));
    ctl_send("drained");
    r = poll(&pc, 1, -1);
    Re(r, errno, "poll(IN) revents=%s", pollbits(pc.revents));
    RD(read(c, buf, sizeof buf), buf, "read");

    /* The same the other way round: we fill, the peer drains. */
    n = fill(c, 8);
    pc.events = POLLOUT;
    r = poll(&pc, 1, 0);
    Re(r, errno, "poll(OUT, 0) when full revents=%s", pollbits(pc.revents));
    ctl_send("drain %llu", n);
    ctl_expect("drained");
    r = poll(&pc, 1, -1);
    Re(r, errno, "poll(OUT) after drain revents=%s", pollbits(pc.revents));
    R(write(c, "after", 5), "write(after)");

    /* Back to blocking with fcntl. */
    R(fcntl(c, F_SETFL, fcntl(c, F_GETFL) & ~O_NONBLOCK), "F_SETFL(~O_NONBLOCK)");
    flags(c, "accepted");
    ctl_send("blocking");
    RD(read(c, buf, 4), buf, "blocking read(4)");
    R(close(c), "close");
    R(close(l), "close listener");
}

static void client(void) {
    char buf[64];
    ctl_expect("ready");
    struct sockaddr_in sa = server_addr();
    int s = (int)RFD(socket(AF_INET, SOCK_STREAM, 0), "socket");
    int one = 1;
    R(ioctl(s, FIONBIO, &one), "ioctl(FIONBIO, 1)");
    flags(s, "client");
    nodelay(s);
    R(connect(s, (struct sockaddr *)&sa, sizeof sa), "connect");
    struct pollfd pf = {s, POLLOUT, 0};
    long r = poll(&pf, 1, -1);
    Re(r, errno, "poll(OUT) revents=%s", pollbits(pf.revents));
    int v = -1;
    socklen_t vl = sizeof v;
    r = getsockopt(s, SOL_SOCKET, SO_ERROR, &v, &vl);
    Re(r, errno, "getsockopt(SO_ERROR) val=%d", v);
    R(connect(s, (struct sockaddr *)&sa, sizeof sa), "connect again");
    R(connect(s, (struct sockaddr *)&sa, sizeof sa), "connect a third time");

    ctl_expect("dial2");
    int s2 = dial();
    R(close(s2), "close second");

    ctl_expect("empty-checked");
    RD(read(s, buf, sizeof buf), buf, "read on empty");
    R(write(s, "ping", 4), "write(ping)");
    ctl_send("pinged");
    ctl_expect("ping-read");

    unsigned long long n = fill(s, 7);
    pf.events = POLLOUT;
    r = poll(&pf, 1, 0);
    Re(r, errno, "poll(OUT, 0) when full revents=%s", pollbits(pf.revents));
    ctl_send("drain %llu", n);
    ctl_expect("drained");
    r = poll(&pf, 1, -1);
    Re(r, errno, "poll(OUT) after drain revents=%s", pollbits(pf.revents));
    R(write(s, "after", 5), "write(after)");

    n = ctl_expect_num("drain");
    uint64_t h = drain_exact(s, n);
    T("drained: sum_ok=%s", yesno(h == pat_sum(8, n)));
    ctl_send("drained");
    pf.events = POLLIN;
    r = poll(&pf, 1, -1);
    Re(r, errno, "poll(IN) revents=%s", pollbits(pf.revents));
    RD(read(s, buf, sizeof buf), buf, "read");

    int zero = 0;
    R(ioctl(s, FIONBIO, &zero), "ioctl(FIONBIO, 0)");
    flags(s, "client");
    ctl_expect("blocking");
    R(write(s, "done", 4), "write(done)");
    RD(read(s, buf, sizeof buf), buf, "read at EOF");
    R(close(s), "close");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
