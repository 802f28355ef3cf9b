/*
 * Shared helpers for the conformance cases. Not a case itself: every case
 * starts with `#include "common.c"` (one translation unit per case keeps the
 * build a single `cc` call). See ../conformance.rs for the harness.
 *
 * The trace: every observable event is one line on stdout, "<tag> <event>",
 * written with a single write(2) so that lines of concurrent threads never mix.
 * The tag names the actor ("S" server, "C" client, "C07" client thread 7, ...);
 * the harness compares the sequence of lines of each tag, so the interleaving
 * of different actors does not matter, only the order within one actor.
 * Nothing that legitimately differs between runs (fd numbers, ports, timings,
 * byte counts that depend on kernel buffer sizes) may be printed.
 *
 * Roles: argv[1] is "both" (server and client as two threads of one process),
 * "server" or "client" (one role per process). The server publishes its port in
 * $CONF_DIR/port; the ends synchronise through two FIFOs in $CONF_DIR (the
 * control channel, never a vmc socket) and through blocking reads of known
 * sizes, never through sleeps.
 */
#pragma GCC diagnostic ignored "-Wunused-function"
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static __thread char tag_[32] = "?";
static const char *rundir_;
static int port_;

/* ---- output ---------------------------------------------------------- */

static void raw_write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) _exit(99);
        p += w;
        n -= (size_t)w;
    }
}

static void set_tag(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tag_, sizeof tag_, fmt, ap);
    va_end(ap);
}

static void vtrace(const char *fmt, va_list ap) {
    char buf[8192];
    int saved = errno;
    int n = snprintf(buf, sizeof buf, "%s ", tag_);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    if (n > (int)sizeof buf - 2) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    raw_write_all(1, buf, (size_t)n);
    errno = saved;
}

/* One trace line. Preserves errno. */
static void T(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vtrace(fmt, ap);
    va_end(ap);
}

/* A fatal harness-level problem (setup failed, protocol out of step): says so
 * on stdout (so the trace differs) and stderr, then exits 3. */
static void die(const char *fmt, ...) {
    char buf[1024];
    int saved = errno;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    T("FATAL %s (errno %s)", buf, saved ? strerrorname_np(saved) : "0");
    fprintf(stderr, "[%s] FATAL %s (errno %d %s)\n", tag_, buf, saved, strerror(saved));
    exit(3);
}

#define MUST(x) must_((long)(x), #x, __LINE__)
static long must_(long r, const char *what, int line) {
    if (r < 0) die("line %d: %s = %ld", line, what, r);
    return r;
}

static const char *ename(int e) {
    const char *n = strerrorname_np(e);
    return n ? n : "E?";
}

/* Prints "<what> = <ret>" or "<what> = -1 <ENAME>"; returns ret. Call it with
 * the system call as the first argument so errno is still the call's. */
static long R(long ret, const char *fmt, ...) {
    int e = errno;
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (ret < 0)
        T("%s = %ld %s", what, ret, ename(e));
    else
        T("%s = %ld", what, ret);
    errno = e;
    return ret;
}

/* Like R with the errno given: for calls whose out-parameters the message
 * prints (argument evaluation order would otherwise race the call). Use as
 *   long r = call(..., &out); int e = errno; Re(r, e, "call val=%d", out);  */
static long Re(long ret, int e, const char *fmt, ...) {
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (ret < 0)
        T("%s = %ld %s", what, ret, ename(e));
    else
        T("%s = %ld", what, ret);
    errno = e;
    return ret;
}

/* For calls that return a descriptor: "<what> = fd" (the number hidden). */
static long RFD(long ret, const char *fmt, ...) {
    int e = errno;
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (ret < 0)
        T("%s = %ld %s", what, ret, ename(e));
    else
        T("%s = fd", what);
    errno = e;
    return ret;
}

/* RFD with the errno given (see Re). */
static long RFDe(long ret, int e, const char *fmt, ...) {
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (ret < 0)
        T("%s = %ld %s", what, ret, ename(e));
    else
        T("%s = fd", what);
    errno = e;
    return ret;
}

/* Printable form of a small buffer, in a rotating thread-local buffer. */
static const char *show(const void *p, long n) {
    static __thread char bufs[4][512];
    static __thread int which;
    char *out = bufs[which++ & 3];
    const unsigned char *s = p;
    int o = 0;
    out[o++] = '"';
    for (long i = 0; i < n && o < 490; i++) {
        if (s[i] >= 32 && s[i] < 127 && s[i] != '"' && s[i] != '\\')
            out[o++] = (char)s[i];
        else
            o += snprintf(out + o, 8, "\\x%02x", s[i]);
    }
    out[o++] = '"';
    out[o] = 0;
    return out;
}

/* Prints "<what> = n "data"" for reads; returns ret. */
static long RD(long ret, const void *buf, const char *fmt, ...) {
    int e = errno;
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (ret < 0)
        T("%s = %ld %s", what, ret, ename(e));
    else
        T("%s = %ld %s", what, ret, show(buf, ret));
    errno = e;
    return ret;
}

static const char *yesno(int b) { return b ? "yes" : "no"; }

/* ---- data ------------------------------------------------------------ */

/* FNV-1a, 64 bit, continuable. */
#define FNV_INIT 0xcbf29ce484222325ULL
static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* Byte `i` of the test stream with seed `seed`. */
static unsigned char pat(unsigned seed, uint64_t i) {
    uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ULL + seed * 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 29;
    return (unsigned char)(x >> 17);
}

static void fill_pat(unsigned seed, uint64_t off, unsigned char *buf, size_t n) {
    for (size_t i = 0; i < n; i++) buf[i] = pat(seed, off + i);
}

static uint64_t pat_sum(unsigned seed, uint64_t n) {
    unsigned char buf[4096];
    uint64_t h = FNV_INIT;
    for (uint64_t off = 0; off < n;) {
        size_t k = n - off < sizeof buf ? (size_t)(n - off) : sizeof buf;
        fill_pat(seed, off, buf, k);
        h = fnv(h, buf, k);
        off += k;
    }
    return h;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* The calling thread's kernel id, for wait_asleep. */
static pid_t tid_self(void) { return (pid_t)syscall(SYS_gettid); }

/* Waits (at most 10 s, then dies) until thread `tid` of this process sleeps in
 * the kernel (state S in /proc: blocked in a system call; a running or
 * preempted thread is R): the event "the other thread is blocked", where a
 * fixed sleep would only hope it is by then. Traces nothing. */
static void wait_asleep(pid_t tid) {
    int saved = errno;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
    double deadline = now_ms() + 10000;
    for (;;) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) break; /* the thread has ended */
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        char state = '?';
        if (n > 0) {
            buf[n] = 0;
            /* "tid (name) S ...": the state follows the last ')'. */
            char *p = strrchr(buf, ')');
            if (p && p[1] == ' ') state = p[2];
        }
        if (state == 'S') break;
        if (now_ms() > deadline) die("thread %d never blocked (state %c)", (int)tid, state);
        sleep_ms(1);
    }
    errno = saved;
}

/* Writes all of buf (blocking socket or pipe); dies on error. */
static void write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {
            struct pollfd pf = {fd, POLLOUT, 0};
            poll(&pf, 1, -1);
            continue;
        }
        if (w <= 0) die("write_all: write = %zd", w);
        p += w;
        n -= (size_t)w;
    }
}

/* Reads exactly n bytes (waiting with poll on a non-blocking fd); dies on
 * EOF or error. */
static void read_exact(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) {
            struct pollfd pf = {fd, POLLIN, 0};
            poll(&pf, 1, -1);
            continue;
        }
        if (r <= 0) die("read_exact: read = %zd with %zu bytes to go", r, n);
        p += r;
        n -= (size_t)r;
    }
}

/* Reads and discards exactly n bytes, returning their checksum. */
static uint64_t drain_exact(int fd, uint64_t n) {
    static __thread unsigned char buf[65536];
    uint64_t h = FNV_INIT;
    while (n > 0) {
        size_t k = n < sizeof buf ? (size_t)n : sizeof buf;
        read_exact(fd, buf, k);
        h = fnv(h, buf, k);
        n -= k;
    }
    return h;
}

/* ---- readiness formatting -------------------------------------------- */

static const char *bits(unsigned v, const unsigned *vals, const char *const *names, int n) {
    static __thread char bufs[4][256];
    static __thread int which;
    char *out = bufs[which++ & 3];
    int o = 0;
    out[0] = 0;
    for (int i = 0; i < n; i++) {
        if (v & vals[i]) {
            o += snprintf(out + o, 256 - (size_t)o, "%s%s", o ? "|" : "", names[i]);
            v &= ~vals[i];
        }
    }
    if (v) o += snprintf(out + o, 256 - (size_t)o, "%s0x%x", o ? "|" : "", v);
    if (!o) snprintf(out, 256, "0");
    return out;
}

static const char *pollbits(short r) {
    static const unsigned v[] = {POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP, POLLNVAL,
                                 POLLRDHUP, POLLRDNORM, POLLRDBAND, POLLWRNORM, POLLWRBAND};
    static const char *const n[] = {"IN", "PRI", "OUT", "ERR", "HUP", "NVAL",
                                    "RDHUP", "RDNORM", "RDBAND", "WRNORM", "WRBAND"};
    return bits((unsigned short)r, v, n, 11);
}

static const char *epbits(uint32_t e) {
    static const unsigned v[] = {EPOLLIN, EPOLLPRI, EPOLLOUT, EPOLLERR, EPOLLHUP,
                                 EPOLLRDHUP, EPOLLRDNORM, EPOLLRDBAND, EPOLLWRNORM, EPOLLWRBAND};
    static const char *const n[] = {"IN", "PRI", "OUT", "ERR", "HUP",
                                    "RDHUP", "RDNORM", "RDBAND", "WRNORM", "WRBAND"};
    return bits(e, v, n, 10);
}

/* poll() and print "<what> = n [name:REVENTS ...]". names: one per fd. */
static int P(const char *what, struct pollfd *p, int n, const char *const *names, int ret) {
    int e = errno;
    char buf[1024];
    int o = 0;
    if (ret < 0) {
        T("%s = %d %s", what, ret, ename(e));
        errno = e;
        return ret;
    }
    buf[0] = 0;
    for (int i = 0; i < n; i++)
        o += snprintf(buf + o, sizeof buf - (size_t)o, " %s:%s", names[i], pollbits(p[i].revents));
    T("%s = %d%s", what, ret, buf);
    errno = e;
    return ret;
}

/* epoll_wait result printer: events sorted by their u64 tag (the order of a
 * ready list is not part of the contract), "<what> = n {tag:EVENTS ...}". */
static int E(const char *what, struct epoll_event *ev, int ret) {
    int e = errno;
    char buf[1024];
    int o = 0;
    if (ret < 0) {
        T("%s = %d %s", what, ret, ename(e));
        errno = e;
        return ret;
    }
    for (int i = 1; i < ret; i++)
        for (int j = i; j > 0 && ev[j - 1].data.u64 > ev[j].data.u64; j--) {
            struct epoll_event t = ev[j];
            ev[j] = ev[j - 1];
            ev[j - 1] = t;
        }
    buf[0] = 0;
    for (int i = 0; i < ret; i++)
        o += snprintf(buf + o, sizeof buf - (size_t)o, " %llu:%s",
                      (unsigned long long)ev[i].data.u64, epbits(ev[i].events));
    T("%s = %d%s", what, ret, buf);
    errno = e;
    return ret;
}

/* ---- control channel: two FIFOs in $CONF_DIR ---------------------------- */

static __thread int ctl_in_ = -1, ctl_out_ = -1;

static void ctl_open(int server) {
    char s2c[4096], c2s[4096];
    snprintf(s2c, sizeof s2c, "%s/ctl-s2c", rundir_);
    snprintf(c2s, sizeof c2s, "%s/ctl-c2s", rundir_);
    if (mkfifo(s2c, 0600) < 0 && errno != EEXIST) die("mkfifo %s", s2c);
    if (mkfifo(c2s, 0600) < 0 && errno != EEXIST) die("mkfifo %s", c2s);
    /* O_RDWR never blocks in open (Linux) and never sees EOF. */
    ctl_in_ = (int)MUST(open(server ? c2s : s2c, O_RDWR | O_CLOEXEC));
    ctl_out_ = (int)MUST(open(server ? s2c : c2s, O_RDWR | O_CLOEXEC));
}

/* Sends one line to the other role. Any thread may send. */
static void ctl_send(const char *fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    buf[n++] = '\n';
    if (ctl_out_ < 0) die("ctl_send without ctl_open");
    if (write(ctl_out_, buf, (size_t)n) != n) die("ctl_send");
}

/* Receives one line from the other role into buf (without the newline). */
static void ctl_recv(char *buf, size_t cap) {
    size_t o = 0;
    for (;;) {
        char c;
        ssize_t r = read(ctl_in_, &c, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r != 1) die("ctl_recv");
        if (c == '\n') break;
        if (o + 1 < cap) buf[o++] = c;
    }
    buf[o] = 0;
}

/* Waits for the line `want` from the other role; dies on anything else. */
static void ctl_expect(const char *want) {
    char buf[256];
    ctl_recv(buf, sizeof buf);
    if (strcmp(buf, want) != 0) die("control channel: expected '%s', got '%s'", want, buf);
}

/* Waits for "<word> <number>" and returns the number. */
static unsigned long long ctl_expect_num(const char *word) {
    char buf[256];
    ctl_recv(buf, sizeof buf);
    size_t k = strlen(word);
    if (strncmp(buf, word, k) != 0 || buf[k] != ' ')
        die("control channel: expected '%s N', got '%s'", word, buf);
    return strtoull(buf + k + 1, NULL, 10);
}

/* ---- connections -------------------------------------------------------- */

/* A listening socket on 127.0.0.1, port chosen by the kernel and published in
 * $CONF_DIR/port (written to a temporary name and renamed into place). */
static int listener(void) {
    int l = (int)MUST(socket(AF_INET, SOCK_STREAM, 0));
    int one = 1;
    MUST(setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one));
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    MUST(bind(l, (struct sockaddr *)&a, sizeof a));
    MUST(listen(l, 128));
    socklen_t al = sizeof a;
    MUST(getsockname(l, (struct sockaddr *)&a, &al));
    port_ = ntohs(a.sin_port);
    char tmp[4096], fin[4096], txt[32];
    snprintf(tmp, sizeof tmp, "%s/port.tmp", rundir_);
    snprintf(fin, sizeof fin, "%s/port", rundir_);
    int f = (int)MUST(open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    int n = snprintf(txt, sizeof txt, "%d\n", port_);
    if (write(f, txt, (size_t)n) != n) die("write port file");
    MUST(close(f));
    MUST(rename(tmp, fin));
    return l;
}

/* The server's port (waits for $CONF_DIR/port to appear: start-up only). */
static int server_port(void) {
    if (port_) return port_;
    char fin[4096];
    snprintf(fin, sizeof fin, "%s/port", rundir_);
    for (int i = 0; i < 20000; i++) {
        FILE *f = fopen(fin, "re");
        if (f) {
            int p = 0;
            if (fscanf(f, "%d", &p) != 1) p = 0;
            fclose(f);
            if (p > 0) return port_ = p;
        }
        sleep_ms(1);
    }
    die("no port file %s", fin);
    return -1;
}

static struct sockaddr_in server_addr(void) {
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)server_port());
    return a;
}

/* TCP_NODELAY. Every connection of the cases sets it: with Nagle, a small
 * write made while earlier data is unacknowledged stays in the sender until an
 * ACK comes (up to the peer's delayed-ACK timeout, 40 ms on loopback), so
 * "written" would not mean "readable by the peer" and traces would depend on
 * timing. vmc's rings have no Nagle; the kernel with TCP_NODELAY is the
 * deterministic reference. */
static void nodelay(int s) {
    int one = 1;
    MUST(setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one));
}

/* A blocking connection to the server; dies on failure (prints nothing). */
static int dial(void) {
    struct sockaddr_in a = server_addr();
    int s = (int)MUST(socket(AF_INET, SOCK_STREAM, 0));
    MUST(connect(s, (struct sockaddr *)&a, sizeof a));
    nodelay(s);
    return s;
}

/* accept() that dies on failure (prints nothing). */
static int take(int l) {
    int c;
    while ((c = accept(l, NULL, NULL)) < 0 && errno == EINTR) {
    }
    MUST(c);
    nodelay(c);
    return c;
}

/* ---- roles --------------------------------------------------------------- */

typedef void (*role_fn)(void);
static role_fn server_fn_;

static void *server_thread_(void *arg) {
    (void)arg;
    set_tag("S");
    ctl_open(1);
    server_fn_();
    return NULL;
}

/* main() of every case: dispatches on argv[1] (both | server | client). */
static int run_roles(int argc, char **argv, role_fn server, role_fn client) {
    rundir_ = getenv("CONF_DIR");
    if (!rundir_ || argc < 2) {
        fprintf(stderr, "usage: CONF_DIR=dir %s both|server|client\n", argv[0]);
        return 2;
    }
    server_fn_ = server;
    if (strcmp(argv[1], "both") == 0) {
        pthread_t t;
        if (pthread_create(&t, NULL, server_thread_, NULL) != 0) die("pthread_create");
        set_tag("C");
        ctl_open(0);
        client();
        if (pthread_join(t, NULL) != 0) die("pthread_join");
    } else if (strcmp(argv[1], "server") == 0) {
        server_thread_(NULL);
    } else if (strcmp(argv[1], "client") == 0) {
        set_tag("C");
        ctl_open(0);
        client();
    } else {
        fprintf(stderr, "unknown role %s\n", argv[1]);
        return 2;
    }
    return 0;
}
