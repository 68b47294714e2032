/* Drives the C core's dump threads over real loopback connections, for a build
 * under ThreadSanitizer (tests/test_dump_threads.py compiles and runs it in a
 * fresh network namespace, with a tiny ring so that helpers also wait for room).
 * Exits 1 if a poll reports other than what the connections are. */
#include "tcpinfo_core.h"

#include <arpa/inet.h>
#include <linux/inet_diag.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#define N 1000

static int check(int ok, const char *what)
{
    if (!ok)
        fprintf(stderr, "FAILED: %s\n", what);
    return ok;
}

int main(void)
{
    static int clients[N];
    int one = 1, err;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
    socklen_t alen = sizeof(a);
    if (bind(ls, (void *)&a, sizeof(a)) || getsockname(ls, (void *)&a, &alen) || listen(ls, N)) {
        perror("listen");
        return 2;
    }
    for (int i = 0; i < N; i++) {
        clients[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(clients[i], (void *)&a, sizeof(a)) < 0 || accept(ls, NULL, NULL) < 0) {
            perror("connect");
            return 2;
        }
    }
    struct tcpi_core *c = tcpi_core_new(65536, &err);
    if (!c || tcpi_set_threads(c, 2, &err))
        return 2;
    tcpi_exclude_local(c, 0);
    /* The poll thread: all of AF_INET6 and remote ports below 40000; the helper the rest. */
    struct inet_diag_bc_op low[2] = {{INET_DIAG_BC_D_LE, 8, 12}, {0, 0, 39999}};
    struct inet_diag_bc_op high[2] = {{INET_DIAG_BC_D_GE, 8, 12}, {0, 0, 40000}};
    tcpi_set_program(c, 0, AF_INET, 0, (const uint8_t *)low, sizeof(low));
    tcpi_set_program(c, 1, AF_INET, 0, (const uint8_t *)high, sizeof(high));
    tcpi_set_program(c, 1, AF_INET6, 1, NULL, 0);
    struct tcpi_poll_result *r;
    int ok = 1;
    tcpi_poll(c, &r);
    ok &= check(r->n_records == 2 * N + 1 && r->inet.messages == 2 * N + 1, "first poll: all new");
    for (int p = 0; p < 30; p++) {
        tcpi_poll(c, &r);
        ok &= check(r->n_records == 0 && r->n_vanished == 0, "idle poll: nothing");
    }
    for (int i = 0; i < N; i += 10)
        close(clients[i]);
    usleep(100000);
    tcpi_poll(c, &r);
    ok &= check(r->n_records >= N / 10 && r->n_vanished == 0, "closing: FIN_WAIT and CLOSE_WAIT");
    int64_t busy[2];
    tcpi_thread_busy(c, busy, 2);
    ok &= check(busy[0] > 0 && busy[1] > 0, "both threads dumped");
    tcpi_core_free(c);
    return ok ? 0 : 1;
}
