/*
 * Case 14, fork while another thread is inside the library:
 *  - the client forks CHILDREN children one after the other; each connects,
 *    writes a numbered message, reads the server's answer and exits with _exit;
 *  - meanwhile another thread of the client opens and closes listeners without
 *    pause (each listen and close registers and unregisters it, taking the
 *    library's process-wide locks), so that some forks happen while it holds
 *    one. A child inherits such a lock held by a thread it does not have: its
 *    connect must neither hang on it nor see state half updated.
 * In the one-process way the server's thread is inside the library too.
 */
#include "common.c"
#include <stdatomic.h>
#include <sys/wait.h>

#define CHILDREN 100

static atomic_int stop_;

static void *churn(void *arg) {
    (void)arg;
    while (!atomic_load(&stop_)) {
        int l = (int)MUST(socket(AF_INET, SOCK_STREAM, 0));
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        MUST(bind(l, (struct sockaddr *)&a, sizeof a));
        MUST(listen(l, 4));
        MUST(close(l));
    }
    return NULL;
}

static void server(void) {
    int l = listener();
    int ok = 0;
    for (int i = 0; i < CHILDREN; i++) {
        int c = take(l);
        char msg[16];
        read_exact(c, msg, sizeof msg);
        char want[16];
        snprintf(want, sizeof want, "child %08d", i);
        if (memcmp(msg, want, sizeof msg) == 0) ok++;
        write_all(c, "ok", 2);
        MUST(close(c));
    }
    T("served %d children, %d in order", CHILDREN, ok);
    R(close(l), "close listener");
}

static void client(void) {
    pthread_t t;
    if (pthread_create(&t, NULL, churn, NULL) != 0) die("pthread_create");
    (void)server_port(); /* read once, before the forks */
    int exited_ok = 0;
    for (int i = 0; i < CHILDREN; i++) {
        pid_t kid = fork();
        MUST(kid);
        if (kid == 0) {
            int s = dial();
            char msg[16];
            snprintf(msg, sizeof msg, "child %08d", i);
            write_all(s, msg, sizeof msg);
            char ans[2];
            read_exact(s, ans, sizeof ans);
            _exit(memcmp(ans, "ok", 2) == 0 ? 0 : 1);
        }
        int st = 0;
        while (waitpid(kid, &st, 0) < 0 && errno == EINTR) {
        }
        if (WIFEXITED(st) && WEXITSTATUS(st) == 0) exited_ok++;
    }
    atomic_store(&stop_, 1);
    if (pthread_join(t, NULL) != 0) die("pthread_join");
    T("forked %d children, %d exited 0", CHILDREN, exited_ok);
}

int main(int argc, char **argv) { return run_roles(argc, argv, server, client); }
