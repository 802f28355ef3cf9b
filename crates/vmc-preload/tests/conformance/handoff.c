/*
 * Case 13, handoff: one thread sleeps in epoll_wait while another adds
 * connections to its set, as Apache's event MPM hands kept-alive connections
 * from its workers to its listener thread. The waiter must wake for bytes that
 * arrive on a connection added after it went to sleep: first on a set that held
 * no connection yet (the waiter sleeps in the kernel alone), then on one that
 * held one before.
 *
 * The server's main thread accepts connection k, waits until the waiter sleeps
 * in the kernel (the case is meaningful only if it sleeps by then; the trace
 * does not depend on it), adds the connection with tag k and tells the client,
 * which sends "ping k". The waiter (tag SW) reports the readiness and the
 * bytes, then removes the connection from its set, as Apache does.
 */
#include "common.c"

#define CONNS 2

static int ep_;
static int conn_[CONNS + 1];
static pid_t waiter_tid_;

static void *waiter(void *arg) {
    (void)arg;
    __atomic_store_n(&waiter_tid_, tid_self(), __ATOMIC_RELEASE);
    set_tag("SW");
    for (int k = 1; k <= CONNS; k++) {
        struct epoll_event ev[4];
        int n = E("epoll_wait(-1)", ev, epoll_wait(ep_, ev, 4, -1));
        if (n != 1) die("the waiter woke with %d events", n);
        if (ev[0].data.u64 != (uint64_t)k) die("woke for tag %llu", (unsigned long long)ev[0].data.u64);
        int c = conn_[k];
        char buf[16];
        RD(read(c, buf, 6), buf, "read(6)");
        R(epoll_ctl(ep_, EPOLL_CTL_DEL, c, NULL), "epoll_ctl(DEL)");
    }
    return NULL;
}

static void server(void) {
    int l = listener();
    ep_ = (int)RFD(epoll_create1(EPOLL_CLOEXEC), "epoll_create1");
    pthread_t t;
    if (pthread_create(&t, NULL, waiter, NULL) != 0) die("pthread_create");
    ctl_send("listening");
    int *c = conn_;
    for (int k = 1; k <= CONNS; k++) {
        c[k] = take(l);
        pid_t w;
        while ((w = __atomic_load_n(&waiter_tid_, __ATOMIC_ACQUIRE)) == 0) sleep_ms(1);
        wait_asleep(w);
        struct epoll_event ev = {0};
        ev.events = EPOLLIN;
        ev.data.u64 = (uint64_t)k;
        R(epoll_ctl(ep_, EPOLL_CTL_ADD, c[k], &ev), "epoll_ctl(ADD, conn %d)", k);
        ctl_send("added %d", k);
    }
    if (pthread_join(t, NULL) != 0) die("pthread_join");
    T("the waiter saw both");
    ctl_send("done");
    for (int k = 1; k <= CONNS; k++) R(close(c[k]), "close(conn %d)", k);
    R(close(ep_), "close(epoll)");
    R(close(l), "close listener");
}

static void client(void) {
    ctl_expect("listening");
    int s[CONNS + 1];
    for (int k = 1; k <= CONNS; k++) {
        s[k] = dial();
        char want[16], msg[8];
        snprintf(want, sizeof want, "added %d", k);
        ctl_expect(want);
        snprintf(msg, sizeof msg, "ping %d", k);
        R(write(s[k], msg, 6), "write(ping %d)", k);
    }
    ctl_expect("done");
    for (int k = 1; k <= CONNS; k++) R(close(s[k]), "close(%d)", k);
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
