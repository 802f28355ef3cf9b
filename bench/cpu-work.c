/* A CPU-bound request/response server and its load, for bench/real-clients.
 *
 *   cpu-work serve PORT WORK_US
 *       Listens on 127.0.0.1:PORT and forks a process per connection (as a
 *       fork-per-connection database does). Each request is 64 bytes; the process
 *       computes for WORK_US microseconds of its own CPU time, then answers with
 *       the request's sequence number and a digest of its work.
 *   cpu-work load PORT PROCS SECONDS
 *       Forks PROCS clients, each with one connection doing request/response for
 *       SECONDS; checks every answer; prints
 *       "requests N seconds S rps R p50_us P errors E".
 *
 * The work is counted in loop iterations calibrated against CLOCK_PROCESS_CPUTIME_ID
 * at start-up, so a server preempted mid-request still does all of its work: a
 * waiter that takes CPU from the server shows up as lost throughput.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MSG 64
#define MAX_SAMPLES (1 << 20)

static volatile uint64_t sink;

static uint64_t work(uint64_t iterations, uint64_t seed) {
    uint64_t x = seed | 1;
    for (uint64_t i = 0; i < iterations; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    sink = x;
    return x;
}

static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double wall_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* Iterations per microsecond of CPU time: the best of a few 20 ms samples. */
static double calibrate(void) {
    double best = 0;
    for (int round = 0; round < 5; round++) {
        uint64_t n = 1 << 16;
        double t0 = cpu_seconds(), t;
        do {
            work(n, n);
            t = cpu_seconds() - t0;
            n *= 2;
        } while (t < 0.02);
        double rate = (n - (1 << 16)) / (t * 1e6);
        if (rate > best)
            best = rate;
    }
    return best;
}

static int full_io(int fd, void *buf, size_t len, int writing) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = writing ? write(fd, (char *)buf + done, len - done)
                            : read(fd, (char *)buf + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return done == 0 && n == 0 ? 0 : -1;
        done += n;
    }
    return 1;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int serve(int port, double work_us) {
    uint64_t iterations = (uint64_t)(calibrate() * work_us);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (l < 0)
        die("socket");
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = loopback(port);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 64))
        die("bind/listen");
    signal(SIGCHLD, SIG_IGN);
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            die("accept");
        }
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            close(l);
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            uint64_t msg[MSG / 8];
            int r;
            while ((r = full_io(c, msg, MSG, 0)) == 1) {
                msg[1] = work(iterations, msg[0]);
                if (full_io(c, msg, MSG, 1) != 1)
                    _exit(1);
            }
            exit(r == 0 ? 0 : 1);
        }
        close(c);
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* One client: writes "count errors" and its samples (us) to `out`. */
static void client(int port, double seconds, int out) {
    int c = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = loopback(port);
    if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof a))
        die("connect");
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    static uint32_t samples[MAX_SAMPLES];
    uint64_t count = 0, errors = 0, msg[MSG / 8];
    double end = wall_seconds() + seconds;
    for (uint64_t seq = 1;; seq++) {
        double t0 = wall_seconds();
        if (t0 >= end)
            break;
        memset(msg, 0, sizeof msg);
        msg[0] = seq;
        if (full_io(c, msg, MSG, 1) != 1 || full_io(c, msg, MSG, 0) != 1) {
            errors++;
            break;
        }
        if (msg[0] != seq)
            errors++;
        if (count < MAX_SAMPLES)
            samples[count] = (uint32_t)((wall_seconds() - t0) * 1e6);
        count++;
    }
    close(c);
    uint64_t head[2] = {count, errors};
    uint64_t kept = count < MAX_SAMPLES ? count : MAX_SAMPLES;
    if (full_io(out, head, sizeof head, 1) != 1 ||
        (kept && full_io(out, samples, kept * 4, 1) != 1))
        _exit(1);
    exit(0);
}

static int load(int port, int procs, double seconds) {
    int pipes[procs];
    double t0 = wall_seconds();
    for (int i = 0; i < procs; i++) {
        int p[2];
        if (pipe(p))
            die("pipe");
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            close(p[0]);
            client(port, seconds, p[1]);
        }
        close(p[1]);
        pipes[i] = p[0];
    }
    uint64_t total = 0, errors = 0, kept = 0;
    uint32_t *all = malloc(sizeof(uint32_t) * MAX_SAMPLES);
    for (int i = 0; i < procs; i++) {
        uint64_t head[2];
        if (full_io(pipes[i], head, sizeof head, 0) != 1) {
            errors++;
            continue;
        }
        total += head[0];
        errors += head[1];
        uint64_t n = head[0] < MAX_SAMPLES ? head[0] : MAX_SAMPLES;
        uint32_t *tmp = malloc(n * 4 + 4);
        if (n && full_io(pipes[i], tmp, n * 4, 0) != 1)
            errors++;
        for (uint64_t j = 0; j < n && kept < MAX_SAMPLES; j++)
            all[kept++] = tmp[j];
        free(tmp);
    }
    int status, failed = 0;
    while (wait(&status) > 0)
        failed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    double spent = wall_seconds() - t0;
    qsort(all, kept, 4, cmp_u32);
    printf("requests %llu seconds %.3f rps %.1f p50_us %u errors %llu\n",
           (unsigned long long)total, spent, total / spent, kept ? all[kept / 2] : 0,
           (unsigned long long)(errors + failed));
    return errors + failed ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "serve"))
        return serve(atoi(argv[2]), atof(argv[3]));
    if (argc == 5 && !strcmp(argv[1], "load"))
        return load(atoi(argv[2]), atoi(argv[3]), atof(argv[4]));
    fprintf(stderr, "usage: cpu-work serve PORT WORK_US | cpu-work load PORT PROCS SECONDS\n");
    return 2;
}
