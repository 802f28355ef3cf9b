/*
 * Case 1, basic: blocking connect/accept, read/write, send/recv flags (PEEK,
 * DONTWAIT, WAITALL), readv/writev, sendmsg/recvmsg, recvfrom, sendmmsg/
 * recvmmsg, FIONREAD, shutdown, EPIPE/SIGPIPE after the peer closed, socket
 * names and options.
 *
 * Built with _FORTIFY_SOURCE so that read/recv/recvfrom/poll become the
 * __read_chk/__recv_chk/__recvfrom_chk/__poll_chk entry points real programs
 * call.
 */
#ifndef _FORTIFY_SOURCE
#define _FORTIFY_SOURCE 2
#endif
#include "common.c"

/* A length the compiler cannot see, so fortified calls go through __*_chk. */
static volatile size_t n16 = 16;

static volatile sig_atomic_t sigpipes;
static void on_sigpipe(int s) {
    (void)s;
    sigpipes++;
}

static const char *family(int f) {
    return f == AF_INET ? "AF_INET" : f == AF_INET6 ? "AF_INET6" : f == AF_UNIX ? "AF_UNIX" : "AF_?";
}

static void names(int fd, int listen_port, int which) {
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    memset(&a, 0, sizeof a);
    long r = which ? getpeername(fd, (struct sockaddr *)&a, &al) : getsockname(fd, (struct sockaddr *)&a, &al);
    T("%s = %ld %s %s len=%u port_is_listener=%s", which ? "getpeername" : "getsockname", r,
      family(a.sin_family), inet_ntoa(a.sin_addr), al, yesno(ntohs(a.sin_port) == listen_port));
}

static void options(int fd) {
    int v = -1;
    socklen_t vl = sizeof v;
    long r = getsockopt(fd, SOL_SOCKET, SO_ERROR, &v, &vl);
    Re(r, errno, "getsockopt(SO_ERROR) val=%d", v);
    v = -1;
    vl = sizeof v;
    r = getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &vl);
    T("getsockopt(SO_TYPE) = %ld stream=%s", r, yesno(v == SOCK_STREAM));
    v = -1;
    vl = sizeof v;
    r = getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &vl);
    T("getsockopt(SO_ACCEPTCONN) = %ld val=%d", r, v);
    v = -1;
    vl = sizeof v;
    r = getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &vl);
    T("getsockopt(SO_DOMAIN) = %ld %s", r, family(v));
}

static void server(void) {
    int l = listener();
    char buf[4096];
    options(l);

    /* connection A: the data path */
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    int c = (int)RFD(accept(l, (struct sockaddr *)&a, &al), "accept");
    nodelay(c);
    T("accept peer %s %s len=%u", family(a.sin_family), inet_ntoa(a.sin_addr), al);
    names(c, port_, 0);
    names(c, port_, 1);
    options(c);

    /* 1: peek, read, dontwait on empty */
    RD(recv(c, buf, n16, MSG_PEEK), buf, "recv(16, PEEK)");
    RD(recv(c, buf, 16, MSG_PEEK), buf, "recv(16, PEEK) again");
    RD(recv(c, buf, 2, MSG_PEEK), buf, "recv(2, PEEK)");
    RD(recv(c, buf, n16, 0), buf, "recv(16)");
    RD(recv(c, buf, 16, MSG_DONTWAIT), buf, "recv(16, DONTWAIT) on empty");
    RD(read(c, buf, 0), buf, "read(0)");
    ctl_send("next");

    /* 2: WAITALL across two writes */
    ctl_expect("w1");
    RD(recv(c, buf, 10, MSG_WAITALL), buf, "recv(10, WAITALL)");
    ctl_send("next");

    /* 3: readv */
    {
        char x[2], y[3], z[4];
        struct iovec iov[3] = {{x, 2}, {y, 3}, {z, 4}};
        long n = readv(c, iov, 3);
        T("readv(2,3,4) = %ld %s %s %s", n, show(x, 2), show(y, 3), show(z, 4));
    }
    ctl_send("next");

    /* 4: recvmsg with several iovecs and a name buffer */
    {
        char x[4], y[5];
        struct iovec iov[2] = {{x, 4}, {y, 5}};
        struct sockaddr_storage ss;
        struct msghdr m = {0};
        m.msg_name = &ss;
        m.msg_namelen = sizeof ss;
        m.msg_iov = iov;
        m.msg_iovlen = 2;
        long n = recvmsg(c, &m, 0);
        T("recvmsg(4,5) = %ld %s %s flags=%d namelen=%u controllen=%zu", n, show(x, 4), show(y, 5),
          m.msg_flags, m.msg_namelen, (size_t)m.msg_controllen);
    }
    ctl_send("next");

    /* 5: recvfrom with and without an address buffer */
    RD(recvfrom(c, buf, n16 - 13, 0, NULL, NULL), buf, "recvfrom(3, NULL addr)");
    {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        long n = recvfrom(c, buf, 3, 0, (struct sockaddr *)&ss, &sl);
        T("recvfrom(3, addr) = %ld %s addrlen=%u", n, show(buf, n > 0 ? n : 0), sl);
    }
    ctl_send("next");

    /* 6: FIONREAD after the peer wrote 1000 bytes */
    ctl_expect("sent");
    {
        struct pollfd pf = {c, POLLIN, 0};
        long r = poll(&pf, 1, -1);
        Re(r, errno, "poll(IN) revents=%s", pollbits(pf.revents));
        int avail = -1;
        r = ioctl(c, FIONREAD, &avail);
        Re(r, errno, "ioctl(FIONREAD) val=%d", avail);
        uint64_t h = drain_exact(c, 1000);
        T("read 1000 sum_ok=%s", yesno(h == pat_sum(1, 1000)));
        avail = -1;
        r = ioctl(c, FIONREAD, &avail);
        Re(r, errno, "ioctl(FIONREAD) val=%d", avail);
    }
    ctl_send("next");

    /* 7: recvmmsg */
    ctl_expect("sent");
    {
        char x[5], y[5];
        struct iovec iov[2] = {{x, 5}, {y, 5}};
        struct mmsghdr mm[2];
        memset(mm, 0, sizeof mm);
        mm[0].msg_hdr.msg_iov = &iov[0];
        mm[0].msg_hdr.msg_iovlen = 1;
        mm[1].msg_hdr.msg_iov = &iov[1];
        mm[1].msg_hdr.msg_iovlen = 1;
        long n = recvmmsg(c, mm, 2, MSG_WAITFORONE, NULL);
        T("recvmmsg(5,5) = %ld len=%u,%u %s %s", n, mm[0].msg_len, mm[1].msg_len, show(x, 5), show(y, 5));
    }
    ctl_send("next");

    /* 8: the peer shut down its sending side; we can still send */
    RD(read(c, buf, sizeof buf), buf, "read after peer SHUT_WR");
    RD(read(c, buf, sizeof buf), buf, "read again");
    R(write(c, "bye", 3), "write(bye)");
    R(close(c), "close");

    /* connection B: the peer closes, we keep writing */
    c = (int)RFD(accept(l, NULL, NULL), "accept B");
    R(close(c), "close B");
    ctl_send("closed");

    R(close(l), "close listener");
}

static void client(void) {
    char buf[4096];
    struct sockaddr_in sa = server_addr();
    int s = (int)RFD(socket(AF_INET, SOCK_STREAM, 0), "socket");
    options(s);
    R(connect(s, (struct sockaddr *)&sa, sizeof sa), "connect");
    nodelay(s);
    names(s, port_, 0);
    names(s, port_, 1);
    options(s);

    R(write(s, "hello", 5), "write(hello)");
    ctl_expect("next");

    R(write(s, "abcd", 4), "write(abcd)");
    ctl_send("w1");
    R(send(s, "efghij", 6, 0), "send(efghij)");
    ctl_expect("next");

    {
        struct iovec iov[3] = {{"ab", 2}, {"cde", 3}, {"fghi", 4}};
        R(writev(s, iov, 3), "writev(2,3,4)");
    }
    ctl_expect("next");

    {
        struct iovec iov[3] = {{"12", 2}, {"345", 3}, {"6789", 4}};
        struct msghdr m = {0};
        m.msg_iov = iov;
        m.msg_iovlen = 3;
        R(sendmsg(s, &m, 0), "sendmsg(2,3,4)");
    }
    ctl_expect("next");

    R(send(s, "xyz", 3, 0), "send(xyz)");
    R(sendto(s, "uvw", 3, 0, NULL, 0), "sendto(uvw, NULL addr)");
    ctl_expect("next");

    {
        unsigned char big[1000];
        fill_pat(1, 0, big, sizeof big);
        R(write(s, big, sizeof big), "write(1000)");
    }
    ctl_send("sent");
    ctl_expect("next");

    {
        struct iovec iov[2] = {{"hello", 5}, {"world", 5}};
        struct mmsghdr mm[2];
        memset(mm, 0, sizeof mm);
        mm[0].msg_hdr.msg_iov = &iov[0];
        mm[0].msg_hdr.msg_iovlen = 1;
        mm[1].msg_hdr.msg_iov = &iov[1];
        mm[1].msg_hdr.msg_iovlen = 1;
        long n = sendmmsg(s, mm, 2, 0);
        T("sendmmsg = %ld len=%u,%u", n, mm[0].msg_len, mm[1].msg_len);
    }
    ctl_send("sent");
    ctl_expect("next");

    R(shutdown(s, SHUT_WR), "shutdown(SHUT_WR)");
    R(send(s, "late", 4, MSG_NOSIGNAL), "send after own SHUT_WR");
    RD(read(s, buf, n16 - 13), buf, "read(3)");
    RD(read(s, buf, sizeof buf), buf, "read at EOF");
    R(close(s), "close");

    /* connection B */
    s = dial();
    ctl_expect("closed");
    RD(read(s, buf, sizeof buf), buf, "B: read after peer close");
    R(send(s, "x", 1, MSG_NOSIGNAL), "B: send(NOSIGNAL) after peer close");
    {
        /* The first send reached a closed socket, which answered with a reset:
         * wait for it (events 0: only ERR/HUP can wake us). The kernel answers
         * at once; the 5 s bound only turns a missing reset into a trace
         * difference instead of a hang. */
        struct pollfd pf = {s, 0, 0};
        long r = poll(&pf, n16 - 15, 5000);
        Re(r, errno, "B: poll(0, 5s) revents=%s", pollbits(pf.revents));
    }
    int v = -1;
    socklen_t vl = sizeof v;
    long r = getsockopt(s, SOL_SOCKET, SO_ERROR, &v, &vl);
    Re(r, errno, "B: getsockopt(SO_ERROR) val=%s", v ? ename(v) : "0");
    R(send(s, "x", 1, MSG_NOSIGNAL), "B: send(NOSIGNAL)");
    T("B: sigpipes=%d", (int)sigpipes);
    R(write(s, "x", 1), "B: write");
    T("B: sigpipes=%d", (int)sigpipes);
    R(send(s, "x", 1, 0), "B: send(0)");
    T("B: sigpipes=%d", (int)sigpipes);
    RD(read(s, buf, sizeof buf), buf, "B: read");
    R(close(s), "B: close");
}

int main(int argc, char **argv) {
    struct sigaction sa = {0};
    sa.sa_handler = on_sigpipe;
    sigaction(SIGPIPE, &sa, NULL);
    return run_roles(argc, argv, server, client);
}
