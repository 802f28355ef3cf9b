/*
 * Case 9, signals and timeouts:
 *  - a blocking read interrupted by a handler installed without SA_RESTART
 *    returns -1 EINTR, and no data is lost;
 *  - with SA_RESTART the read goes on and returns the data sent later;
 *  - poll and epoll_wait return EINTR even with SA_RESTART (never restarted);
 *  - SO_RCVTIMEO: a blocking read returns -1 EAGAIN after the timeout; a read
 *    with a timeout is not restarted either (EINTR despite SA_RESTART);
 *  - SO_SNDTIMEO: a blocking write into a full send side returns a partial
 *    count or -1 EAGAIN after the timeout.
 * A helper thread of the reading role sends the signals with pthread_kill,
 * repeatedly until the reader's call returned, so a signal that comes before
 * the call starts does not matter (only how often the handler ran would
 * differ, and that is not printed).
 */
#include "common.c"

static volatile sig_atomic_t fired_;
static void on_signal(int s) {
    (void)s;
    fired_++;
}

static void handler(int sig, int flags) {
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    MUST(sigaction(sig, &sa, NULL));
}

struct kicker {
    pthread_t target, thread;
    int sig;
    volatile int stop;
};

static void *kick(void *arg) {
    struct kicker *k = arg;
    while (!k->stop) {
        pthread_kill(k->target, k->sig);
        sleep_ms(10); /* the point: a signal now and then, however long the call blocks */
    }
    return NULL;
}

static void kick_start(struct kicker *k, int sig) {
    fired_ = 0;
    k->target = pthread_self();
    k->sig = sig;
    k->stop = 0;
    if (pthread_create(&k->thread, NULL, kick, k) != 0) die("pthread_create");
}

static void kick_stop(struct kicker *k) {
    k->stop = 1;
    if (pthread_join(k->thread, NULL) != 0) die("pthread_join");
    T("handler ran=%s", yesno(fired_ > 0));
}

/* For the SA_RESTART read: one signal while blocked, then, once the read is
 * blocked again, the peer is asked for the data. */
struct restarter {
    pthread_t target;
    pid_t target_tid;
    int ctl_out;
};

static void *restart_helper(void *arg) {
    struct restarter *r = arg;
    wait_asleep(r->target_tid);
    pthread_kill(r->target, SIGUSR2);
    while (!fired_) sleep_ms(1);
    wait_asleep(r->target_tid);
    if (write(r->ctl_out, "send xyz\n", 9) != 9) die("ctl");
    return NULL;
}

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
    int c = take(l);
    struct kicker k;

    /* read, no SA_RESTART */
    handler(SIGUSR1, 0);
    kick_start(&k, SIGUSR1);
    RD(read(c, buf, sizeof buf), buf, "read, handler without SA_RESTART");
    kick_stop(&k);
    ctl_send("send abc");
    RD(read(c, buf, sizeof buf), buf, "read");

    /* recv, no SA_RESTART */
    kick_start(&k, SIGUSR1);
    RD(recv(c, buf, sizeof buf, 0), buf, "recv, handler without SA_RESTART");
    kick_stop(&k);

    /* read, SA_RESTART */
    handler(SIGUSR2, SA_RESTART);
    fired_ = 0;
    {
        struct restarter r = {pthread_self(), tid_self(), ctl_out_};
        pthread_t t;
        if (pthread_create(&t, NULL, restart_helper, &r) != 0) die("pthread_create");
        RD(read(c, buf, sizeof buf), buf, "read, handler with SA_RESTART");
        if (pthread_join(t, NULL) != 0) die("pthread_join");
        T("handler ran=%s", yesno(fired_ > 0));
    }

    /* poll and epoll_wait are not restarted */
    {
        struct pollfd q = {c, POLLIN, 0};
        kick_start(&k, SIGUSR2);
        long r = poll(&q, 1, -1);
        Re(r, errno, "poll(-1), handler with SA_RESTART revents=%s", pollbits(q.revents));
        kick_stop(&k);
        int ep = (int)MUST(epoll_create1(0));
        struct epoll_event ev = {0};
        ev.events = EPOLLIN;
        MUST(epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev));
        kick_start(&k, SIGUSR2);
        R(epoll_wait(ep, &ev, 1, -1), "epoll_wait(-1), handler with SA_RESTART");
        kick_stop(&k);
        close(ep);
    }

    /* SO_RCVTIMEO */
    {
        struct timeval tv = {0, 100000};
        R(setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv), "setsockopt(SO_RCVTIMEO, 100ms)");
        struct timeval got = {0, 0};
        socklen_t gl = sizeof got;
        long r = getsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &got, &gl);
        Re(r, errno, "getsockopt(SO_RCVTIMEO) = %ld.%06ld", (long)got.tv_sec, (long)got.tv_usec);
        double t0 = now_ms();
        RD(read(c, buf, sizeof buf), buf, "read with SO_RCVTIMEO");
        T("waited_100ms=%s", yesno(now_ms() - t0 >= 90));
        t0 = now_ms();
        RD(recv(c, buf, sizeof buf, 0), buf, "recv with SO_RCVTIMEO");
        T("waited_100ms=%s", yesno(now_ms() - t0 >= 90));
        tv.tv_sec = 10;
        tv.tv_usec = 0;
        MUST(setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv));
        kick_start(&k, SIGUSR2);
        RD(read(c, buf, sizeof buf), buf, "read with SO_RCVTIMEO 10s, handler with SA_RESTART");
        kick_stop(&k);
        tv.tv_sec = 0;
        MUST(setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv));
        ctl_send("send def");
        RD(read(c, buf, sizeof buf), buf, "read without timeout");
    }

    /* SO_SNDTIMEO: keep writing until a write fails */
    {
        struct timeval tv = {0, 100000};
        R(setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv), "setsockopt(SO_SNDTIMEO, 100ms)");
        double t0 = now_ms();
        unsigned long long n = fill(c, 9);
        T("waited_100ms=%s", yesno(now_ms() - t0 >= 90));
        ctl_send("drain %llu", n);
        ctl_expect("drained");
        tv.tv_usec = 0;
        MUST(setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv));
        R(write(c, "ok", 2), "write(ok)");
    }

    ctl_send("end");
    RD(read(c, buf, sizeof buf), buf, "read at EOF");
    R(close(c), "close");
    R(close(l), "close listener");
}

static void client(void) {
    char buf[256];
    int s = dial();
    for (;;) {
        ctl_recv(buf, sizeof buf);
        if (strncmp(buf, "send ", 5) == 0) {
            R(write(s, buf + 5, strlen(buf + 5)), "write(%s)", buf + 5);
        } else if (strncmp(buf, "drain ", 6) == 0) {
            unsigned long long m = strtoull(buf + 6, NULL, 10);
            uint64_t h = drain_exact(s, m);
            T("drained: sum_ok=%s", yesno(h == pat_sum(9, m)));
            ctl_send("drained");
            RD(recv(s, buf, 2, MSG_WAITALL), buf, "recv(2, WAITALL)");
        } else if (strcmp(buf, "end") == 0) {
            break;
        } else {
            die("unknown command %s", buf);
        }
    }
    R(shutdown(s, SHUT_WR), "shutdown(SHUT_WR)");
    R(close(s), "close");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
