/*
 * Case 8, threads: 16 client threads each connect to one listener, send their
 * index and 64 KiB, shut down their sending side and read back 64 KiB that the
 * server derived from what it got, then EOF. The server accepts on one thread
 * and serves each connection on a thread of its own. Each connection traces
 * under its own tag (C00..C15 and S00..S15), so the order in which the
 * threads run does not matter.
 */
#include "common.c"

#define THREADS 16
#define BYTES 65536

static void *serve(void *arg) {
    int c = (int)(intptr_t)arg;
    unsigned char idx[4];
    read_exact(c, idx, 4);
    set_tag("S%02u", idx[3]);
    T("index %u", idx[3]);
    static __thread unsigned char buf[BYTES];
    read_exact(c, buf, BYTES);
    uint64_t h = fnv(FNV_INIT, buf, BYTES);
    T("got %d bytes sum_ok=%s", BYTES, yesno(h == pat_sum(100 + idx[3], BYTES)));
    for (int i = 0; i < BYTES; i++) buf[i] ^= 0xa5;
    write_all(c, buf, BYTES);
    T("sent %d bytes back", BYTES);
    char b[16];
    RD(read(c, b, sizeof b), b, "read at EOF");
    R(close(c), "close");
    return NULL;
}

static void server(void) {
    int l = listener();
    pthread_t t[THREADS];
    ctl_send("listening");
    for (int i = 0; i < THREADS; i++) {
        int c = take(l);
        if (pthread_create(&t[i], NULL, serve, (void *)(intptr_t)c) != 0) die("pthread_create");
    }
    T("accepted %d", THREADS);
    for (int i = 0; i < THREADS; i++)
        if (pthread_join(t[i], NULL) != 0) die("pthread_join");
    T("served %d", THREADS);
    R(close(l), "close listener");
}

static void *talk(void *arg) {
    unsigned i = (unsigned)(intptr_t)arg;
    set_tag("C%02u", i);
    struct sockaddr_in sa = server_addr();
    int s = (int)RFD(socket(AF_INET, SOCK_STREAM, 0), "socket");
    R(connect(s, (struct sockaddr *)&sa, sizeof sa), "connect");
    nodelay(s);
    unsigned char idx[4] = {0, 0, 0, (unsigned char)i};
    R(write(s, idx, 4), "write(index)");
    static __thread unsigned char buf[BYTES];
    fill_pat(100 + i, 0, buf, BYTES);
    write_all(s, buf, BYTES);
    T("sent %d bytes", BYTES);
    R(shutdown(s, SHUT_WR), "shutdown(SHUT_WR)");
    read_exact(s, buf, BYTES);
    int ok = 1;
    for (int k = 0; k < BYTES; k++) ok &= buf[k] == (pat(100 + i, (uint64_t)k) ^ 0xa5);
    T("got %d bytes back ok=%s", BYTES, yesno(ok));
    char b[16];
    RD(read(s, b, sizeof b), b, "read at EOF");
    R(close(s), "close");
    return NULL;
}

static void client(void) {
    ctl_expect("listening");
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        if (pthread_create(&t[i], NULL, talk, (void *)(intptr_t)i) != 0) die("pthread_create");
    for (int i = 0; i < THREADS; i++)
        if (pthread_join(t[i], NULL) != 0) die("pthread_join");
    T("all %d done", THREADS);
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
