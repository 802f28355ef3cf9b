/*
 * Case 7, exec: a process reads the first half of a stream, then execs itself
 * ("after-exec", the fd number and the running checksum in argv) and the new
 * image reads the rest; the total checksum must match what the peer sent.
 *  A. the new image keeps the environment (so LD_PRELOAD, when it is set);
 *  B. the new image runs without LD_PRELOAD: whatever the library did to the
 *     connection, the fd must still be a working TCP socket;
 *  C. posix_spawn instead of fork and exec: the server reads the first half
 *     itself, spawns the reader of the rest and closes its copy.
 *  D. as A, but the parent keeps its copy and, once the child is gone, writes
 *     on it after the new image's answer: the connection the child moved to
 *     TCP before its exec is the parent's to use.
 * A forked child does the exec, so that in "both" mode the client thread
 * lives on in the parent.
 */
#include "common.c"
#include <spawn.h>

#define TOTAL (256 * 1024)
#define HALF (TOTAL / 2)

extern char **environ;

/* The image after exec: argv = self after-exec FD HASH LABEL. */
static int after_exec(char **argv) {
    /* its own tag: in C it runs beside the server process that spawned it */
    set_tag("E");
    int fd = atoi(argv[2]);
    uint64_t h = strtoull(argv[3], NULL, 16);
    const char *label = argv[4];
    T("%s: after exec", label);
    int v = -1;
    socklen_t vl = sizeof v;
    long r = getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &vl);
    Re(r, errno, "%s: getsockopt(SO_TYPE) stream=%s", label, yesno(v == SOCK_STREAM));
    static unsigned char buf[65536];
    uint64_t got = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("read after exec");
        if (n == 0) break;
        h = fnv(h, buf, (size_t)n);
        got += (uint64_t)n;
    }
    T("%s: after exec read %llu more, total sum_ok=%s", label, (unsigned long long)got,
      yesno(h == pat_sum(5, TOTAL)));
    R(write(fd, "done", 4), "%s: write(done)", label);
    R(close(fd), "%s: close", label);
    return 0;
}

static void one(int l, const char *label, int keep_env, int parent_writes) {
    int c = take(l);
    pid_t pid = fork();
    MUST(pid);
    if (pid == 0) {
        static unsigned char half[HALF];
        read_exact(c, half, HALF);
        uint64_t h = fnv(FNV_INIT, half, HALF);
        T("%s: child read the first half", label);
        char fdtxt[16], htxt[32];
        snprintf(fdtxt, sizeof fdtxt, "%d", c);
        snprintf(htxt, sizeof htxt, "%016llx", (unsigned long long)h);
        char *args[] = {"exec", "after-exec", fdtxt, htxt, (char *)label, NULL};
        if (keep_env) {
            execv("/proc/self/exe", args);
        } else {
            /* the environment without LD_PRELOAD */
            static char *env[256];
            int k = 0;
            for (char **e = environ; *e && k < 255; e++)
                if (strncmp(*e, "LD_PRELOAD=", 11) != 0) env[k++] = *e;
            env[k] = NULL;
            execve("/proc/self/exe", args, env);
        }
        die("exec");
    }
    if (!parent_writes) R(close(c), "%s: parent close(its copy)", label);
    ctl_send("go");
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    T("%s: child exited=%s status=%d", label, yesno(WIFEXITED(st)), WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st));
    if (parent_writes) {
        R(write(c, "!", 1), "%s: parent write(!)", label);
        R(close(c), "%s: parent close", label);
    }
}

static void spawned(int l, const char *label) {
    int c = take(l);
    ctl_send("go");
    static unsigned char half[HALF];
    read_exact(c, half, HALF);
    uint64_t h = fnv(FNV_INIT, half, HALF);
    T("%s: parent read the first half", label);
    char fdtxt[16], htxt[32];
    snprintf(fdtxt, sizeof fdtxt, "%d", c);
    snprintf(htxt, sizeof htxt, "%016llx", (unsigned long long)h);
    char *args[] = {"exec", "after-exec", fdtxt, htxt, (char *)label, NULL};
    pid_t pid;
    int r = posix_spawn(&pid, "/proc/self/exe", NULL, NULL, args, environ);
    T("%s: posix_spawn = %s", label, r == 0 ? "0" : ename(r));
    R(close(c), "%s: parent close(its copy)", label);
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    T("%s: spawned exited=%s status=%d", label, yesno(WIFEXITED(st)), WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st));
}

static void server(void) {
    int l = listener();
    one(l, "A", 1, 0);
    one(l, "B", 0, 0);
    spawned(l, "C");
    one(l, "D", 1, 1);
    R(close(l), "close listener");
}

/* `answer`: how many bytes come back ("done", and the parent's "!" in D). */
static void client_one(const char *label, size_t answer) {
    char buf[64];
    int s = dial();
    ctl_expect("go");
    static unsigned char chunk[16384];
    for (uint64_t off = 0; off < TOTAL; off += sizeof chunk) {
        fill_pat(5, off, chunk, sizeof chunk);
        write_all(s, chunk, sizeof chunk);
    }
    T("%s: sent %d bytes", label, TOTAL);
    R(shutdown(s, SHUT_WR), "%s: shutdown(SHUT_WR)", label);
    RD(recv(s, buf, answer, MSG_WAITALL), buf, "%s: recv(%zu, WAITALL)", label, answer);
    RD(read(s, buf, sizeof buf), buf, "%s: read at EOF", label);
    R(close(s), "%s: close", label);
}

static void client(void) {
    client_one("A", 4);
    client_one("B", 4);
    client_one("C", 4);
    client_one("D", 5);
}

int main(int argc, char **argv) {
    if (argc >= 5 && strcmp(argv[1], "after-exec") == 0) return after_exec(argv);
    return run_roles(argc, argv, server, client);
}
