/*
 * Case 10, sendfile and splice:
 *  - sendfile from a regular file into the socket, 1 MiB with an offset
 *    pointer (the file position stays), then 4 KiB from the file position
 *    (which moves); the peer checks the checksum;
 *  - splice from the socket into a pipe and from the pipe back into the
 *    socket (an echo, 4 x 64 KiB in lock step); splice on an empty
 *    non-blocking socket is EAGAIN, at EOF it returns 0.
 */
#include "common.c"
#include <sys/sendfile.h>

#define FILE_BYTES (1024 * 1024)
#define CHUNK 65536
#define CHUNKS 4

static void server(void) {
    int l = listener();
    int c = take(l);

    /* the file */
    char path[4096];
    snprintf(path, sizeof path, "%s/sendfile.dat", rundir_);
    int f = (int)MUST(open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    static unsigned char buf[65536];
    for (uint64_t off = 0; off < FILE_BYTES; off += sizeof buf) {
        fill_pat(11, off, buf, sizeof buf);
        write_all(f, buf, sizeof buf);
    }
    MUST(lseek(f, 0, SEEK_SET));

    off_t off = 0;
    uint64_t sent = 0;
    int calls_ok = 1;
    while (sent < FILE_BYTES) {
        ssize_t n = sendfile(c, f, &off, FILE_BYTES - sent);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            calls_ok = 0;
            R(n, "sendfile");
            break;
        }
        sent += (uint64_t)n;
    }
    T("sendfile(&off) total=%llu off=%lld calls_ok=%s", (unsigned long long)sent, (long long)off, yesno(calls_ok));
    R(lseek(f, 0, SEEK_CUR), "lseek(CUR) after sendfile(&off)");
    R(sendfile(c, f, NULL, 4096), "sendfile(NULL, 4096)");
    R(lseek(f, 0, SEEK_CUR), "lseek(CUR) after sendfile(NULL)");
    R(close(f), "close(file)");
    ctl_expect("received");

    /* splice echo */
    int p[2];
    MUST(pipe(p));
    ctl_send("echo");
    for (int i = 0; i < CHUNKS; i++) {
        uint64_t in = 0, out = 0;
        while (in < CHUNK) {
            ssize_t n = splice(c, NULL, p[1], NULL, CHUNK - in, SPLICE_F_MOVE);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) die("splice in = %zd", n);
            in += (uint64_t)n;
            while (out < in) {
                ssize_t m = splice(p[0], NULL, c, NULL, in - out, SPLICE_F_MOVE);
                if (m < 0 && errno == EINTR) continue;
                if (m <= 0) die("splice out = %zd", m);
                out += (uint64_t)m;
            }
        }
        T("chunk %d: spliced in %llu out %llu", i, (unsigned long long)in, (unsigned long long)out);
    }
    int fl = fcntl(c, F_GETFL);
    MUST(fcntl(c, F_SETFL, fl | O_NONBLOCK));
    R(splice(c, NULL, p[1], NULL, CHUNK, SPLICE_F_MOVE), "splice(empty non-blocking socket)");
    MUST(fcntl(c, F_SETFL, fl));
    ctl_send("shut");
    R(splice(c, NULL, p[1], NULL, CHUNK, SPLICE_F_MOVE), "splice at EOF");
    R(close(p[0]), "close(pipe)");
    R(close(p[1]), "close(pipe)");
    R(close(c), "close");
    R(close(l), "close listener");
}

static void client(void) {
    int s = dial();
    uint64_t h = drain_exact(s, FILE_BYTES);
    T("received %d sum_ok=%s", FILE_BYTES, yesno(h == pat_sum(11, FILE_BYTES)));
    h = drain_exact(s, 4096);
    T("received 4096 sum_ok=%s", yesno(h == pat_sum(11, 4096)));
    ctl_send("received");

    ctl_expect("echo");
    static unsigned char out[CHUNK], in[CHUNK];
    for (int i = 0; i < CHUNKS; i++) {
        fill_pat(20 + (unsigned)i, 0, out, CHUNK);
        write_all(s, out, CHUNK);
        read_exact(s, in, CHUNK);
        T("chunk %d: echo ok=%s", i, yesno(memcmp(in, out, CHUNK) == 0));
    }
    ctl_expect("shut");
    R(shutdown(s, SHUT_WR), "shutdown(SHUT_WR)");
    char b[16];
    RD(read(s, b, sizeof b), b, "read at EOF");
    R(close(s), "close");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
