/*
 * Case 5, duplicated descriptors: dup, dup2, dup3, fcntl(F_DUPFD,
 * F_DUPFD_CLOEXEC); connect through a dup and use the original; data read and
 * written through every copy; dup2 of a pipe over one copy; closing copies
 * keeps the connection alive until the last one (closed with close_range)
 * goes, and only then does the peer read EOF.
 *
 * Fixed target numbers (200, 201, 300) are far above anything the program
 * opens, so no other thread can take them; the trace shows only whether a
 * call returned the number asked for.
 */
#include "common.c"

static void server(void) {
    int l = listener();
    char buf[64];
    int c = take(l);

    int d1 = (int)RFD(dup(c), "dup");
    long r = dup2(c, 200);
    RFDe(r, errno, "dup2(c, 200) returned_200=%s", yesno(r == 200));
    int d2 = 200;
    r = dup3(c, 201, O_CLOEXEC);
    RFDe(r, errno, "dup3(c, 201, O_CLOEXEC) returned_201=%s", yesno(r == 201));
    int d3 = 201;
    T("201: F_GETFD cloexec=%s", yesno(fcntl(d3, F_GETFD) & FD_CLOEXEC));
    T("200: F_GETFD cloexec=%s", yesno(fcntl(d2, F_GETFD) & FD_CLOEXEC));
    r = fcntl(c, F_DUPFD, 300);
    RFDe(r, errno, "fcntl(F_DUPFD, 300) at_least_300=%s", yesno(r >= 300));
    int d4 = (int)r;
    int d5 = (int)RFD(fcntl(c, F_DUPFD_CLOEXEC, 0), "fcntl(F_DUPFD_CLOEXEC)");
    T("d5: F_GETFD cloexec=%s", yesno(fcntl(d5, F_GETFD) & FD_CLOEXEC));
    r = dup2(c, c);
    RFDe(r, errno, "dup2(c, c) returned_c=%s", yesno(r == c));
    R(dup3(c, c, 0), "dup3(c, c)");

    /* reading through every copy */
    int fds[6] = {c, d1, d2, d3, d4, d5};
    const char *names[6] = {"c", "d1", "d2", "d3", "d4", "d5"};
    ctl_send("send");
    for (int i = 0; i < 6; i++) RD(read(fds[i], buf, 2), buf, "read(%s, 2)", names[i]);
    /* writing through every copy */
    for (int i = 0; i < 6; i++) {
        char w[2] = {'w', (char)('0' + i)};
        R(write(fds[i], w, 2), "write(%s)", names[i]);
    }
    {
        struct sockaddr_in a;
        socklen_t al = sizeof a;
        r = getpeername(d4, (struct sockaddr *)&a, &al);
        Re(r, errno, "getpeername(d4) %s", inet_ntoa(a.sin_addr));
        int v = -1;
        socklen_t vl = sizeof v;
        r = getsockopt(d5, SOL_SOCKET, SO_ERROR, &v, &vl);
        Re(r, errno, "getsockopt(d5, SO_ERROR) val=%d", v);
        int avail = -1;
        ctl_send("send-one");
        ctl_expect("sent");
        struct pollfd q = {d3, POLLIN, 0};
        r = poll(&q, 1, -1);
        Re(r, errno, "poll(d3, IN) revents=%s", pollbits(q.revents));
        r = ioctl(d2, FIONREAD, &avail);
        Re(r, errno, "ioctl(d2, FIONREAD) val=%d", avail);
        RD(read(d4, buf, 2), buf, "read(d4, 2)");
    }

    /* dup2 of a pipe over one copy of the socket */
    int p[2];
    MUST(pipe(p));
    r = dup2(p[0], d2);
    RFDe(r, errno, "dup2(pipe, 200) returned_200=%s", yesno(r == d2));
    R(write(p[1], "pp", 2), "write(pipe)");
    RD(read(d2, buf, 2), buf, "read(200, 2) now the pipe");
    R(close(d2), "close(200)");
    R(close(p[0]), "close(pipe)");
    R(close(p[1]), "close(pipe)");

    /* closing copies one by one */
    R(close(c), "close(c)");
    ctl_send("send");
    RD(read(d1, buf, 2), buf, "read(d1, 2)");
    R(write(d1, "x1", 2), "write(d1)");
    R(close(d1), "close(d1)");
    R(close(d3), "close(d3)");
    R(close(d4), "close(d4)");
    ctl_send("closed-some");
    ctl_expect("checked");
    ctl_send("send");
    RD(read(d5, buf, 2), buf, "read(d5, 2)");
    R(close_range((unsigned)d5, (unsigned)d5, 0), "close_range(d5, d5)");
    ctl_send("closed-all");
    R(close(l), "close listener");
}

static void client(void) {
    char buf[64];
    struct sockaddr_in sa = server_addr();
    int s = (int)RFD(socket(AF_INET, SOCK_STREAM, 0), "socket");
    int d = (int)RFD(dup(s), "dup");
    R(connect(d, (struct sockaddr *)&sa, sizeof sa), "connect(dup)");
    R(close(d), "close(dup)");
    nodelay(s);
    {
        struct sockaddr_in a;
        socklen_t al = sizeof a;
        long r = getpeername(s, (struct sockaddr *)&a, &al);
        Re(r, errno, "getpeername(s) %s", inet_ntoa(a.sin_addr));
    }
    ctl_expect("send");
    R(write(s, "r0r1r2r3r4r5", 12), "write(12)");
    RD(recv(s, buf, 12, MSG_WAITALL), buf, "recv(12, WAITALL)");
    ctl_expect("send-one");
    R(write(s, "r6", 2), "write(2)");
    ctl_send("sent");
    ctl_expect("send");
    R(write(s, "r7", 2), "write(2)");
    RD(read(s, buf, 2), buf, "read(2)");
    ctl_expect("closed-some");
    {
        struct pollfd q = {s, POLLIN | POLLRDHUP, 0};
        long r = poll(&q, 1, 0);
        Re(r, errno, "poll(IN|RDHUP, 0) with one copy left revents=%s", pollbits(q.revents));
    }
    ctl_send("checked");
    ctl_expect("send");
    R(write(s, "r8", 2), "write(2)");
    ctl_expect("closed-all");
    RD(read(s, buf, sizeof buf), buf, "read at EOF");
    R(close(s), "close");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
