/*
 * threads.c - dump threads: helpers that dump a share of each family on sockets of
 * their own and hand every receive buffer to the poll thread, which alone diffs.
 */
#define _GNU_SOURCE
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <errno.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <unistd.h>

/* Wakes a thread sleeping on cond, if its flag says it may be.  The sleeper sets
 * the flag before its last look at the counters and the waker publishes before
 * reading the flag (both sequentially consistent), so one of them sees the
 * other: the common case costs no lock, and no wake-up is lost. */
static void wake(struct tcpi_core *c, int *sleeping, pthread_cond_t *cond)
{
    if (!__atomic_load_n(sleeping, __ATOMIC_SEQ_CST))
        return;
    pthread_mutex_lock(&c->pool.mu);
    pthread_cond_broadcast(cond);
    pthread_mutex_unlock(&c->pool.mu);
}

static int ring_full(const struct dumper *d)
{
    return d->head - __atomic_load_n(&d->tail, __ATOMIC_SEQ_CST) == RING;
}

/* A helper's next empty ring buffer; waits (not counted as busy) while all are full. */
uint8_t *free_slot(struct tcpi_core *c, struct dumper *d, int64_t *waited)
{
    if (ring_full(d)) {
        int64_t t0 = now_ns(CLOCK_MONOTONIC);
        pthread_mutex_lock(&c->pool.mu);
        __atomic_store_n(&d->sleeping, 1, __ATOMIC_SEQ_CST);
        while (ring_full(d))
            pthread_cond_wait(&c->pool.space, &c->pool.mu);
        __atomic_store_n(&d->sleeping, 0, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&c->pool.mu);
        *waited += now_ns(CLOCK_MONOTONIC) - t0;
    }
    return d->ring[d->head % RING];
}

void hand_over(struct tcpi_core *c, struct dumper *d, int f, uint32_t n)
{
    uint32_t k = d->head % RING;
    d->ring_len[k] = n;
    d->ring_seq[k] = d->seq;
    d->ring_family[k] = (uint8_t)f;
    __atomic_store_n(&d->head, d->head + 1, __ATOMIC_SEQ_CST);
    wake(c, &c->pool.sleeping, &c->pool.ready);
}

/* Something for the poll thread: a chunk to diff, or every helper done with the job. */
static int helpers_moved(const struct tcpi_core *c)
{
    int all_done = 1;
    for (uint32_t i = 1; i < c->pool.n; i++) {
        const struct dumper *d = &c->pool.dumpers[i];
        if (__atomic_load_n(&d->head, __ATOMIC_SEQ_CST) != d->tail)
            return 1;
        all_done &= __atomic_load_n(&d->done_job, __ATOMIC_SEQ_CST) == c->pool.job;
    }
    return all_done;
}

/* Diffs the chunks the helpers have handed over (poll thread only): between its
 * own recvs, and with wait after its own dumps, until every helper is done. */
void diff_helpers(struct tcpi_core *c, int wait)
{
    for (;;) {
        int pending = 0;
        for (uint32_t i = 1; i < c->pool.n; i++) {
            struct dumper *d = &c->pool.dumpers[i];
            /* done first: once it is seen, head covers every chunk of the job */
            int done = __atomic_load_n(&d->done_job, __ATOMIC_ACQUIRE) == c->pool.job;
            uint32_t head = __atomic_load_n(&d->head, __ATOMIC_ACQUIRE), tail = d->tail;
            if (tail == head) {
                pending |= !done;
                continue;
            }
            int64_t t0 = now_ns(CLOCK_MONOTONIC);
            for (; tail != head; tail++) {
                uint32_t k = tail % RING;
                int f = d->ring_family[k];
                c->source = (int)(2 * i) + f;
                if (d->diff_ok[f] && walk(c, d->ring_seq[k], d->port_id, d->ring[k],
                                          d->ring_len[k], &d->diffed[f], PROCESS, NULL) < 0)
                    d->diff_ok[f] = 0;
            }
            __atomic_store_n(&d->tail, tail, __ATOMIC_SEQ_CST);
            wake(c, &d->sleeping, &c->pool.space);
            if (wait)   /* between recvs, the poll thread's dump time already has it */
                c->pool.dumpers[0].busy_ns += now_ns(CLOCK_MONOTONIC) - t0;
            pending |= !done;
        }
        if (!wait || !pending)
            return;
        pthread_mutex_lock(&c->pool.mu);
        __atomic_store_n(&c->pool.sleeping, 1, __ATOMIC_SEQ_CST);
        while (!helpers_moved(c))
            pthread_cond_wait(&c->pool.ready, &c->pool.mu);
        __atomic_store_n(&c->pool.sleeping, 0, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&c->pool.mu);
    }
}

static void *helper_main(void *arg)
{
    struct dumper *d = arg;
    struct tcpi_core *c = d->core;
    uint32_t seen = d->job_seen;
    pthread_mutex_lock(&c->pool.mu);
    for (;;) {
        while (c->pool.job == seen && !c->pool.quit)
            pthread_cond_wait(&c->pool.go, &c->pool.mu);
        if (c->pool.quit)
            break;
        seen = c->pool.job;
        pthread_mutex_unlock(&c->pool.mu);
        for (int f = 0; f < 2; f++)
            d->ok[f] = dump_share(c, d, f, &d->st[f], STREAM);
        pthread_mutex_lock(&c->pool.mu);
        __atomic_store_n(&d->done_job, seen, __ATOMIC_SEQ_CST);
        pthread_cond_broadcast(&c->pool.ready);
    }
    pthread_mutex_unlock(&c->pool.mu);
    return NULL;
}

/* A family's stats over all threads: counts add up, the first failure and the
 * latest end stand, and the duration is the longest thread's. */
void merge_stats(struct tcpi_family_stats *into, const struct tcpi_family_stats *from)
{
    into->messages += from->messages;
    into->excluded += from->excluded;
    into->bad += from->bad;
    into->recvs += from->recvs;
    if (!into->status && from->status) {
        into->status = from->status;
        into->errno_value = from->errno_value;
    }
    into->interrupted |= from->interrupted;
    if (from->end_realtime_ns > into->end_realtime_ns)
        into->end_realtime_ns = from->end_realtime_ns;
    if (from->duration_ns > into->duration_ns)
        into->duration_ns = from->duration_ns;
}

/* A dumper with its socket; a helper (ring != 0) also gets its ring buffers. */
int dumper_init(struct tcpi_core *c, struct dumper *d, int ring)
{
    memset(d, 0, sizeof(*d));
    d->fd = -1;
    d->core = c;
    d->buf_size = c->recv_size;
    int ok = (d->buf = malloc(d->buf_size)) != NULL;
    for (int k = 0; ring && ok && k < RING; k++)
        ok = (d->ring[k] = malloc(d->buf_size)) != NULL;
    if (!ok) {   /* the caller's dumper_free releases what was allocated */
        errno = ENOMEM;
        return -1;
    }
    return open_socket(d);
}

void dumper_free(struct dumper *d)
{
    if (d->fd >= 0)
        close(d->fd);
    free(d->buf);
    free(d->prog[0].code);
    free(d->prog[1].code);
    for (int k = 0; k < RING; k++)
        free(d->ring[k]);
}

void stop_helpers(struct tcpi_core *c)
{
    pthread_mutex_lock(&c->pool.mu);
    c->pool.quit = 1;
    pthread_cond_broadcast(&c->pool.go);
    pthread_mutex_unlock(&c->pool.mu);
    for (uint32_t i = 1; i < c->pool.n; i++) {
        pthread_join(c->pool.dumpers[i].thread, NULL);
        dumper_free(&c->pool.dumpers[i]);
    }
    c->pool.quit = 0;
    c->pool.n = c->pool.n ? 1 : 0;
}

int tcpi_set_program(struct tcpi_core *c, uint32_t thread, uint8_t family, int skip,
                     const uint8_t *bc, uint32_t len)
{
    if (thread >= c->pool.n || len > 65535 - NLA_HDRLEN ||
        (family != AF_INET && family != AF_INET6))
        return -1;
    struct program *prog = &c->pool.dumpers[thread].prog[family_slot(family)];
    uint8_t *copy = NULL;
    if (len) {
        copy = calloc(1, NLA_ALIGN(len));
        if (!copy)
            return -1;
        memcpy(copy, bc, len);
    }
    free(prog->code);
    prog->code = copy;
    prog->len = len;
    prog->skip = skip != 0;
    return 0;
}

int tcpi_set_threads(struct tcpi_core *c, uint32_t n, int *err)
{
    if (n < 1 || n > MAX_THREADS) {
        *err = EINVAL;
        return -1;
    }
    stop_helpers(c);
    struct dumper *v = realloc(c->pool.dumpers, n * sizeof(*v));
    if (!v) {
        *err = ENOMEM;
        return -1;
    }
    c->pool.dumpers = v;
    for (uint32_t i = 1; i < n; i++) {
        struct dumper *d = &c->pool.dumpers[i];
        int rc = dumper_init(c, d, 1);
        d->job_seen = c->pool.job;   /* polls only run on this thread: no lock needed */
        if (rc == 0 && (rc = pthread_create(&d->thread, NULL, helper_main, d)) != 0)
            errno = rc;
        if (rc != 0) {
            *err = errno;
            dumper_free(d);
            stop_helpers(c);
            return -1;
        }
        c->pool.n = i + 1;
    }
    return 0;
}

void tcpi_port_histogram(struct tcpi_core *c, uint8_t family, uint32_t *local, uint32_t *remote)
{
    memset(local, 0, 256 * sizeof(*local));
    memset(remote, 0, 256 * sizeof(*remote));
    for (uint32_t i = 0; i < c->tbl.cap; i++) {
        const struct entry *e = &c->tbl.slots[i];
        if (e->used && e->fate == LIVE && e->data && entry_family(e) == family) {
            const uint8_t *sport = (const uint8_t *)&entry_id(e)->idiag_sport;
            const uint8_t *dport = (const uint8_t *)&entry_id(e)->idiag_dport;
            local[sport[0]]++;   /* by the port's high byte (network order: the first) */
            remote[dport[0]]++;
        }
    }
}

void tcpi_thread_busy(struct tcpi_core *c, int64_t *ns, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        ns[i] = i < c->pool.n ? c->pool.dumpers[i].busy_ns : 0;
        if (i < c->pool.n)
            c->pool.dumpers[i].busy_ns = 0;
    }
}
