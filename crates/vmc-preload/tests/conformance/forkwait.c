/*
 * Case 16, forkwait: a fork while another thread waits in a read.
 *
 * The client's reader thread is blocked in recv on the connection (both
 * directions on the rings by then) when the main thread forks. The thread goes
 * on with its call in the parent, with no new call; the child writes a request
 * on the connection and exits. The server answers it, and the answer reaches
 * the parent's reader. Then the parent writes on, and the stream ends in order.
 *
 * The connection is the parent's: a thread of it was inside a call at the fork.
 * Had the child's write claimed it, two processes would drive its rings.
 */
#include "common.c"
#include <sched.h>
#include <stdatomic.h>

/* Each way before the fork: enough for the connection to be on the rings by
 * then, both directions. */
#define BYTES (1 << 20)

static int conn_;
static unsigned char up_[BYTES], down_[BYTES];
static pid_t reader_tid_;
static atomic_int reader_ready_;

static void *reader(void *arg) {
    (void)arg;
    set_tag("R");
    char buf[64];
    reader_tid_ = tid_self();
    atomic_store(&reader_ready_, 1);
    RD(recv(conn_, buf, 6, MSG_WAITALL), buf, "recv(6, WAITALL)");
    return NULL;
}

static void server(void) {
    int l = listener();
    int a = take(l);
    char buf[64];
    uint64_t h = drain_exact(a, BYTES);
    T("read %d bytes ok=%s", BYTES, yesno(h == pat_sum(1, BYTES)));
    fill_pat(2, 0, down_, BYTES);
    write_all(a, down_, BYTES);
    /* The child's request, then the answer the parent's reader waits for. */
    RD(recv(a, buf, 10, MSG_WAITALL), buf, "recv(10, WAITALL)");
    R(write(a, "answer", 6), "write(answer)");
    RD(recv(a, buf, 11, MSG_WAITALL), buf, "recv(11, WAITALL)");
    RD(read(a, buf, sizeof buf), buf, "read at EOF");
    R(close(a), "close");
    R(close(l), "close listener");
}

static void client(void) {
    char buf[64];
    conn_ = dial();
    fill_pat(1, 0, up_, BYTES);
    write_all(conn_, up_, BYTES);
    uint64_t h = drain_exact(conn_, BYTES);
    T("read %d bytes ok=%s", BYTES, yesno(h == pat_sum(2, BYTES)));

    pthread_t t;
    if (pthread_create(&t, NULL, reader, NULL) != 0) die("pthread_create");
    while (!atomic_load(&reader_ready_)) sched_yield();
    wait_asleep(reader_tid_);
    pid_t pid = fork();
    MUST(pid);
    if (pid == 0) {
        ssize_t w = write(conn_, "from-child", 10);
        exit(w == 10 ? 0 : 1);
    }
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    T("child: exited=%s status=%d", yesno(WIFEXITED(st)), WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st));
    if (pthread_join(t, NULL) != 0) die("pthread_join");
    R(write(conn_, "from-parent", 11), "write(from-parent)");
    R(shutdown(conn_, SHUT_WR), "shutdown(SHUT_WR)");
    RD(read(conn_, buf, sizeof buf), buf, "read at EOF");
    R(close(conn_), "close");
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
