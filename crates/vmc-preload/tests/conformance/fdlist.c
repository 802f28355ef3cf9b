/*
 * Case 15, a program that lists its own descriptors:
 *  - after a connection carried 1 MiB one way and 5 bytes back (moving to shared
 *    memory meanwhile), each end lists /proc/self/fd,
 *    /dev/fd and /proc/<pid>/fd (opendir + readdir), /proc/self/fd through
 *    fdopendir, and through readdir64;
 *  - the listing must hold exactly the open numbers below 1024 (found by probing
 *    each with fcntl), plus the listing's own descriptor: the numbers vmc keeps
 *    for itself, at 1024 and above, are not the program's and do not show.
 * The two ends take turns (over the control channel) so that no thread of the
 * process opens or closes a descriptor while the other one lists.
 */
#define _LARGEFILE64_SOURCE
#include "common.c"
#include <dirent.h>

#define PROBED 1024

/* Checks one listing against the probed set; `how` names the listing. */
static void check_listing(const char *how, DIR *d) {
    if (!d) {
        T("%s: cannot open: %s", how, ename(errno));
        return;
    }
    static char listed[PROBED];
    memset(listed, 0, sizeof listed);
    int own = dirfd(d), extra = 0;
    for (;;) {
        errno = 0;
        struct dirent64 *e = readdir64(d);
        if (!e) break;
        if (e->d_name[0] == '.') continue;
        int fd = atoi(e->d_name);
        if (fd >= 0 && fd < PROBED)
            listed[fd] = 1;
        else
            extra++;
    }
    int missing = 0, unknown = 0;
    for (int fd = 0; fd < PROBED; fd++) {
        int open_now = fd == own || fcntl(fd, F_GETFD) >= 0;
        if (open_now && !listed[fd]) missing++;
        if (!open_now && listed[fd]) unknown++;
    }
    T("%s: open numbers missing %d, listed but closed %d, listed at %d or above %d", how, missing,
      unknown, PROBED, extra);
    closedir(d);
}

/* The same through readdir (not readdir64). */
static void check_listing_readdir(const char *how, const char *path) {
    DIR *d = opendir(path);
    if (!d) {
        T("%s: cannot open: %s", how, ename(errno));
        return;
    }
    int n = 0, high = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        n++;
        if (atoi(e->d_name) >= PROBED) high++;
    }
    T("%s: listed at %d or above %d", how, PROBED, high);
    (void)n;
    closedir(d);
}

static void check_all(void) {
    char path[64];
    check_listing("opendir(/proc/self/fd)", opendir("/proc/self/fd"));
    check_listing("opendir(/dev/fd)", opendir("/dev/fd"));
    snprintf(path, sizeof path, "/proc/%d/fd/", (int)getpid());
    check_listing("opendir(/proc/<pid>/fd/)", opendir(path));
    snprintf(path, sizeof path, "/proc/self/task/%d/fd", (int)tid_self());
    check_listing("opendir(/proc/self/task/<tid>/fd)", opendir(path));
    int fd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    check_listing("fdopendir(/proc/self/fd)", fd >= 0 ? fdopendir(fd) : NULL);
    check_listing_readdir("readdir(/proc/self/fd)", "/proc/self/fd");
}

#define BYTES (1024 * 1024)
#define FIRST 65536

static void server(void) {
    int l = listener();
    int c = take(l);
    /* A first chunk and a round trip before the rest (time to attach), so that
     * the listings happen with the connection on shared memory. */
    static unsigned char buf[BYTES];
    read_exact(c, buf, FIRST);
    ctl_send("more");
    read_exact(c, buf + FIRST, BYTES - FIRST);
    T("read %d bytes, sum_ok=%s", BYTES, yesno(fnv(FNV_INIT, buf, BYTES) == pat_sum(7, BYTES)));
    R(write(c, "world", 5), "write(world)");
    ctl_expect("listed");
    check_all();
    ctl_send("listed");
    RD(read(c, buf, sizeof buf), buf, "read at EOF");
    R(close(c), "close");
    R(close(l), "close listener");
}

static void client(void) {
    int s = dial();
    static unsigned char out[BYTES];
    fill_pat(7, 0, out, BYTES);
    write_all(s, out, FIRST);
    ctl_expect("more");
    write_all(s, out + FIRST, BYTES - FIRST);
    char buf[5];
    RD(recv(s, buf, 5, MSG_WAITALL), buf, "recv(5)");
    check_all();
    ctl_send("listed");
    ctl_expect("listed");
    R(shutdown(s, SHUT_WR), "shutdown(SHUT_WR)");
    R(close(s), "close");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
