/*
 * poll.c - one poll (a sweep of every socket): each family's dump, or one walk of
 * both, every socket diffed against the previous poll (upstream's Compare), and the
 * sweep that reports what vanished; the core's life cycle.
 */
#define _GNU_SOURCE
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <malloc.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <unistd.h>

#define CLOSED_KEEP_NS (60 * 1000000000LL)  /* how long a late destroy is recognised */
#define TIMER_TIMEWAIT 3      /* idiag_timer of a time-wait socket, and of nothing else */

static const uint8_t FAMILIES[2] = {AF_INET6, AF_INET};   /* the order of a poll's dumps */

/* Handles one inet_diag message of a dump or a look-up.  Returns -1 for lack of
 * memory, else 0.  Static, so that it is inlined in the dump's loop. */
static inline __attribute__((always_inline))
int on_socket(struct tcpi_core *c, const uint8_t *p, uint32_t n, struct tcpi_family_stats *st)
{
    st->messages++;
    if (n < IDM_LEN) {
        st->bad++;
        return 0;
    }
    if (filter_drops(&c->filter, p)) {
        st->excluded++;
        return 0;
    }
    struct image img;   /* the message's, when the table keeps images */
    int have_img = 0;
    const int compact = c->destroy.fd >= 0;
    uint64_t cookie = idm_cookie(p);
    struct entry *e = table_find(&c->tbl, cookie);
    uint8_t kind;
    if (e->used && (e->fate == FINISHED || e->fate == REMNANT)) {
        e->epoch = c->epoch;   /* the time-wait remnant of a connection already closed */
        return 0;
    }
    if (e->used && e->fate == HELD) {
        e->epoch = c->epoch;
        if (recently_short(c, p))
            settle_remnant(c, e);
        return 0;
    }
    if (e->used && e->fate == LIVE) {
        const struct image *prev = entry_image(e);
        if (prev && image_same_layout(p, n, prev, &img, &kind)) {
            have_img = 1;   /* most polls of an idle socket: told without a walk */
        } else if (prev ? image_make(p, n, &img) < 0 : diff(p, n, e->data, e->len, &kind) < 0) {
            st->bad++;
            e->epoch = c->epoch;  /* a malformed message still proves the socket exists */
            return 0;
        } else if (prev) {
            have_img = 1;
            kind = image_compare(&img, prev);
        }
    } else {
        /* New, or a CLOSED cookie connected again (tcp_disconnect keeps the socket). */
        int created;
        struct attrs ca;
        if (compact ? image_make(p, n, &img) < 0 : parse_attrs(p, n, &ca) < 0) {
            st->bad++;
            return 0;
        }
        have_img = compact;
        if (!e->used && c->destroy.fd >= 0 && idm_timer(p) == TIMER_TIMEWAIT)
            return hold_timewait(c, p, n, cookie);
        if (!(e = table_get(&c->tbl, cookie, &created)))
            return -1;
        kind = TCPI_PREVIOUS_WAS_NIL;
        e->fate = LIVE;
    }
    e->epoch = c->epoch;
    e->since_ns = 0;
    e->family = idm_family(p);
    /* The first poll finds every connection new: that says nothing of which are active. */
    if (kind != TCPI_NO_CHANGE && !e->active && c->tier.idle_lookups && c->epoch > 1 &&
        tier_join(c, e) < 0)
        return -1;
    /* An unchanged message equals the stored copy in every byte Compare reads, so
     * the copy is only renewed on a change: comparing with it is comparing with the
     * previous poll's message, as upstream does.  What it misses in between are
     * timers and counters that move only with compared ones (bytes_sent moves with
     * segs_out), so the vanished report still carries the last counters. */
    if (kind == TCPI_NO_CHANGE)
        return 0;
    count_bytes(c, p, n, e);
    if (compact && !have_img)
        have_img = image_make(p, n, &img) == 0;
    if (compact && have_img ? entry_store_image(e, &img) < 0 : entry_store(e, p, n) < 0)
        return -1;
    /* The time is its dump's end, not known yet: the source stands in (see stamp). */
    return result_add(c, &c->changed, p, n, cookie, idm_family(p), kind, -(int64_t)c->source - 1);
}

int take_message(struct tcpi_core *c, const uint8_t *p, uint32_t n, struct tcpi_family_stats *st)
{
    return on_socket(c, p, n, st);
}

/* Before a recv's messages are diffed, asks the memory system for what they will
 * touch: first every cookie's table slot, then each known socket's stored copy.
 * The misses then overlap instead of stalling the diff one socket at a time. */
static void prefetch(struct tcpi_core *c, const uint8_t *b, uint32_t n, uint16_t type)
{
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t pos = 0; pos + sizeof(struct nlmsghdr) + IDM_LEN <= n;) {
            const struct nlmsghdr *h = (const struct nlmsghdr *)(b + pos);
            if (h->nlmsg_len < sizeof(*h) || h->nlmsg_len > n - pos)
                break;
            if (h->nlmsg_type == type && h->nlmsg_len >= sizeof(*h) + IDM_LEN) {
                uint64_t cookie = idm_cookie((const uint8_t *)(h + 1));
                if (pass == 0) {
                    __builtin_prefetch(&c->tbl.slots[table_slot(&c->tbl, cookie)]);
                } else {
                    const struct entry *e = table_find(&c->tbl, cookie);
                    uint32_t len = entry_image(e) ? sizeof(struct image) : e->len;
                    for (uint32_t off = 0; e->used && off < len; off += 64)
                        __builtin_prefetch(e->data + off);
                }
            }
            pos += NLMSG_ALIGN(h->nlmsg_len);
        }
    }
}

static struct tcpi_family_stats *own_stats(struct tcpi_core *c, int f);

/* In one walk of both families, a message counts in its own family's stats. */
static struct tcpi_family_stats *walked_stats(struct tcpi_core *c, const uint8_t *p, uint32_t n,
                                              struct tcpi_family_stats *st)
{
    if (n < IDM_LEN)
        return st;
    return own_stats(c, family_slot(idm_family(p)));
}

/* Walks the netlink messages of one recv.  Returns 1 when the dump is done,
 * 0 to keep reading, -1 on failure (st->status set). */
int walk(struct tcpi_core *c, uint32_t seq, uint32_t port_id, const uint8_t *b, uint32_t n,
                struct tcpi_family_stats *st, enum walk_mode mode, int64_t *count)
{
    uint32_t pos = 0;
    /* Read once: the diff writes through c, so the compiler cannot hoist these itself. */
    const int both = c->walking_both;
    const uint16_t type = both ? TCPDIAG_GETSOCK : SOCK_DIAG_BY_FAMILY;
    if (mode == PROCESS)
        prefetch(c, b, n, type);
    while (pos + sizeof(struct nlmsghdr) <= n) {
        const struct nlmsghdr *h = (const struct nlmsghdr *)(b + pos);
        if (h->nlmsg_len < sizeof(*h) || h->nlmsg_len > n - pos) {
            st->status = TCPI_E_TRUNCATED;
            return -1;
        }
        if (h->nlmsg_seq != seq) {
            st->status = TCPI_E_SEQ;
            return -1;
        }
        if (h->nlmsg_pid != port_id) {
            st->status = TCPI_E_PID;
            return -1;
        }
        if (h->nlmsg_flags & NLM_F_DUMP_INTR)
            st->interrupted = 1;
        const uint8_t *payload = b + pos + sizeof(*h);
        uint32_t plen = h->nlmsg_len - sizeof(*h);
        if (h->nlmsg_type == NLMSG_DONE)
            return 1;
        if (h->nlmsg_type == NLMSG_ERROR) {
            int32_t code = 0;
            if (plen < 4) {
                st->status = TCPI_E_TRUNCATED;
                return -1;
            }
            memcpy(&code, payload, 4);
            if (code == 0)
                return 1;
            st->status = TCPI_E_NLMSG_ERROR;
            st->errno_value = -code;
            return -1;
        }
        if (mode == STREAM) {
            /* counted when the poll thread diffs the chunk */
        } else if (h->nlmsg_type != type) {
            st->bad++;
        } else if (mode == COUNT) {
            (*count)++;
        } else if (on_socket(c, payload, plen, both ? walked_stats(c, payload, plen, st) : st) < 0) {
            st->status = TCPI_E_NOMEM;
            return -1;
        }
        if (!(h->nlmsg_flags & NLM_F_MULTI))
            return 1;
        pos += NLMSG_ALIGN(h->nlmsg_len);
    }
    return 0;
}

/* The poll thread's own stats for family slot f. */
static struct tcpi_family_stats *own_stats(struct tcpi_core *c, int f)
{
    return f ? &c->result.inet : &c->result.inet6;
}

/* Gives each record the end of the dump it came in (its thread's dump of its
 * family), as upstream stamps a family's records. */
static void stamp(struct tcpi_core *c)
{
    for (uint32_t i = 0; i < c->changed.n; i++) {
        struct tcpi_record *r = &c->changed.v[i];
        int64_t source = -r->realtime_ns - 1;
        uint32_t thread = (uint32_t)(source / 2);
        int f = (int)(source % 2);
        const struct tcpi_family_stats *st = thread ? &c->pool.dumpers[thread].st[f] : own_stats(c, f);
        r->realtime_ns = st->end_realtime_ns;
    }
}

static int dump(struct tcpi_core *c, struct dumper *d, uint8_t family, uint32_t states,
                struct tcpi_family_stats *st, enum walk_mode mode, int64_t *count)
{
    int64_t t0 = now_ns(CLOCK_MONOTONIC), waited = 0;
    int f = family == AF_UNSPEC ? 0 : family_slot(family);
    int rc = -1;
    memset(st, 0, sizeof(*st));
    if (send_request(d, c->ext, family, states) < 0) {
        st->status = TCPI_E_SYSCALL;
        st->errno_value = errno;
        goto out;
    }
    for (;;) {
        int trunc;
        uint8_t *buf = mode == STREAM ? free_slot(c, d, &waited) : d->buf;
        ssize_t n = recv_some(d, buf, &trunc);
        if (n < 0 || trunc) {
            st->status = n < 0 ? TCPI_E_SYSCALL : TCPI_E_TRUNCATED;
            st->errno_value = n < 0 ? errno : EMSGSIZE;
            break;
        }
        st->recvs++;
        if (mode == PROCESS)
            c->source = f;   /* PROCESS runs on the poll thread only: thread 0 */
        int w = walk(c, d->seq, d->port_id, buf, (uint32_t)n, st, mode, count);
        if (w >= 0 && mode == STREAM)
            hand_over(c, d, f, (uint32_t)n);
        if (mode == PROCESS)
            diff_helpers(c, 0);   /* what the helpers brought meanwhile */
        if (w != 0) {
            rc = w > 0 ? 0 : -1;
            break;
        }
    }
out:
    if (rc < 0)
        reset_socket(d);
    st->end_realtime_ns = now_ns(CLOCK_REALTIME);
    st->duration_ns = now_ns(CLOCK_MONOTONIC) - t0;
    if (mode != COUNT)   /* benchmarks and audits are not a poll's work */
        d->busy_ns += st->duration_ns - waited;
    return rc;
}

/* Dumps a thread's share of family slot f; a skipped family counts as done (it is
 * not this thread's), with empty stats.  Returns 1 if the share is complete. */
int dump_share(struct tcpi_core *c, struct dumper *d, int f,
                      struct tcpi_family_stats *st, enum walk_mode mode)
{
    if (d->prog[f].skip) {
        memset(st, 0, sizeof(*st));
        return 1;
    }
    return dump(c, d, FAMILIES[f], c->states, st, mode, NULL) == 0;
}

/* After the dumps: connections of a completed family that were not seen. */
static void sweep(struct tcpi_core *c, int ok6, int ok4, int64_t now_real)
{
    int64_t now = now_ns(CLOCK_MONOTONIC);
    for (uint32_t i = 0; i < c->tbl.cap;) {
        struct entry *e = &c->tbl.slots[i];
        int done = e->family == AF_INET6 ? ok6 : ok4;
        if (e->used && e->fate == HELD && done) {
            int gone = e->epoch != c->epoch;
            if (!gone && now_real - e->since_ns < c->destroy.grace_ns) {
                i++;
                continue;
            }
            if (recently_short(c, e->data)) {
                settle_remnant(c, e);
            } else {   /* unclaimed: a connection of its own, as upstream records it */
                if (result_add(c, &c->changed, e->data, e->len, e->cookie, e->family,
                           TCPI_PREVIOUS_WAS_NIL, e->since_ns) < 0)
                    break;
                e->fate = LIVE;
                e->since_ns = 0;
            }
        }
        if (!e->used || e->epoch == c->epoch || !done) {
            i++;
            continue;
        }
        if (e->fate == LIVE && c->destroy.fd >= 0 && (e->since_ns == 0 || now - e->since_ns < c->destroy.grace_ns)) {
            if (e->since_ns == 0)
                e->since_ns = now;  /* give its destroy notification time to arrive */
            i++;
            continue;
        }
        if (e->fate == CLOSED && now - e->since_ns < CLOSED_KEEP_NS) {
            i++;
            continue;
        }
        if (e->fate == LIVE) {
            /* Its last message, if the table kept it (not an image): else an empty record,
             * the close of a connection whose notification was lost. */
            if (result_add(c, &c->gone, entry_image(e) ? NULL : e->data, e->len, e->cookie,
                           e->family, TCPI_NO_CHANGE, now_real) < 0)
                break;
            entry_drop(e);
            if (c->destroy.fd >= 0) {      /* wait for a late notification */
                e->fate = CLOSED;
                e->since_ns = now;
                i++;
                continue;
            }
        }
        table_delete_at(&c->tbl, i);  /* slot i now holds a shifted entry: re-examine */
    }
    forget_shortflows(c, now);
}

void reset_result(struct tcpi_core *c)
{
    /* The first poll of a busy host reports every socket; do not keep that much
     * memory for the idle polls that follow. */
    if (c->arena.cap > (1u << 20) && c->arena.len < c->arena.cap / 4) {
        free(c->arena.data);
        c->arena.data = NULL;
        c->arena.cap = 0;
    }
    c->arena.len = 0;
    c->changed.n = c->gone.n = c->destroyed.n = 0;
    memset(&c->result.destroy, 0, sizeof(c->result.destroy));
    memset(&c->result.inet6, 0, sizeof(c->result.inet6));
    memset(&c->result.inet, 0, sizeof(c->result.inet));
    memset(&c->result.lookup, 0, sizeof(c->result.lookup));
    c->result.joined = 0;
    c->result.bytes_sent = c->result.bytes_received = 0;
    c->result.one_walk = 0;
}

void publish(struct tcpi_core *c, struct tcpi_poll_result **out)
{
    struct tcpi_poll_result *r = &c->result;
    r->records = c->changed.v;
    r->n_records = c->changed.n;
    r->vanished = c->gone.v;
    r->n_vanished = c->gone.n;
    r->destroyed = c->destroyed.v;
    r->n_destroyed = c->destroyed.n;
    r->data = c->arena.data;
    r->data_len = c->arena.len;
    r->tracked = c->tbl.count;
    r->active = c->tier.n;
    *out = r;
}

struct tcpi_core *tcpi_core_new(uint32_t recv_size, int *err)
{
    struct tcpi_core *c = calloc(1, sizeof(*c));
    if (!c) {
        *err = ENOMEM;
        return NULL;
    }
    c->recv_size = recv_size < MIN_RECV ? MIN_RECV : recv_size;
    c->ext = 0xFF;
    c->states = 0x0F37;
    c->filter.exclude_local = 1;
    c->destroy.fd = -1;
    c->destroy.q.wake_fd = c->destroy.q.stop_fd[0] = c->destroy.q.stop_fd[1] = -1;
    pthread_mutex_init(&c->destroy.q.mu, NULL);
    c->netns = open(THREAD_NETNS, O_RDONLY | O_CLOEXEC);   /* -1 without /proc: no switching */
    pthread_mutex_init(&c->pool.mu, NULL);
    pthread_cond_init(&c->pool.go, NULL);
    pthread_cond_init(&c->pool.ready, NULL);
    pthread_cond_init(&c->pool.space, NULL);
    c->pool.dumpers = calloc(1, sizeof(*c->pool.dumpers));
    if (!c->pool.dumpers || table_grow(&c->tbl) < 0 || table_grow(&c->shortflows) < 0) {
        *err = ENOMEM;
        tcpi_core_free(c);
        return NULL;
    }
    c->pool.n = 1;
    if (dumper_init(c, &c->pool.dumpers[0], 0) < 0) {
        *err = errno;
        tcpi_core_free(c);
        return NULL;
    }
    return c;
}

void tcpi_core_free(struct tcpi_core *c)
{
    if (!c)
        return;
    if (c->pool.dumpers) {
        stop_helpers(c);
        if (c->pool.n)
            dumper_free(&c->pool.dumpers[0]);
        free(c->pool.dumpers);
    }
    pthread_mutex_destroy(&c->pool.mu);
    pthread_cond_destroy(&c->pool.go);
    pthread_cond_destroy(&c->pool.ready);
    pthread_cond_destroy(&c->pool.space);
    destroy_stop(c);
    pthread_mutex_destroy(&c->destroy.q.mu);
    if (c->netns >= 0)
        close(c->netns);
    for (uint32_t i = 0; i < c->tbl.cap; i++)
        free(c->tbl.slots[i].data);
    free(c->tbl.slots);
    free(c->shortflows.slots);
    free(c->filter.dstip);
    free(c->filter.incl_net);
    free(c->arena.data);
    free(c->changed.v);
    free(c->gone.v);
    free(c->destroyed.v);
    tier_free(c);
    free(c);
}

void tcpi_set_request(struct tcpi_core *c, uint8_t ext, uint32_t states)
{
    c->ext = ext;
    c->states = states;
}

void tcpi_forget_all(struct tcpi_core *c)
{
    for (uint32_t i = 0; i < c->tbl.cap; i++) {
        free(c->tbl.slots[i].data);
        memset(&c->tbl.slots[i], 0, sizeof(c->tbl.slots[i]));
    }
    c->tbl.count = 0;
    c->tier.n = 0;
    memset(c->shortflows.slots, 0, c->shortflows.cap * sizeof(*c->shortflows.slots));
    c->shortflows.count = 0;
}

void tcpi_set_one_walk(struct tcpi_core *c, int on)
{
    c->one_walk = on;
}

/* Whether this sweep can be one walk: only the poll thread dumps, both families
 * with the same program. */
static int can_walk_both(const struct tcpi_core *c)
{
    const struct program *p = c->pool.dumpers[0].prog;
    return c->one_walk && c->pool.n == 1 && !p[0].skip && !p[1].skip && p[0].len == p[1].len &&
           (p[0].len == 0 || memcmp(p[0].code, p[1].code, p[0].len) == 0);
}

/* One walk of both families: each family's stats count its own messages, and share
 * the walk's framing (recvs, failure, end time); its duration is split between them
 * by their messages. */
static int walk_both(struct tcpi_core *c)
{
    struct tcpi_family_stats *s6 = own_stats(c, 0), *s4 = own_stats(c, 1), walk_st;
    memset(&walk_st, 0, sizeof(walk_st));
    c->walking_both = 1;
    int ok = dump(c, &c->pool.dumpers[0], AF_UNSPEC, c->states, &walk_st, PROCESS, NULL) == 0;
    c->walking_both = 0;
    c->result.one_walk = 1;
    uint64_t m6 = s6->messages, m4 = s4->messages, all = m6 + m4;
    int64_t d6 = all ? (int64_t)(walk_st.duration_ns * m6 / all) : walk_st.duration_ns / 2;
    for (int f = 0; f < 2; f++) {
        struct tcpi_family_stats *s = own_stats(c, f);
        s->messages += walk_st.messages;   /* those of neither family, and short ones */
        s->bad += walk_st.bad;
        s->recvs = walk_st.recvs;
        s->status = walk_st.status;
        s->errno_value = walk_st.errno_value;
        s->interrupted = walk_st.interrupted;
        s->end_realtime_ns = walk_st.end_realtime_ns;
        s->duration_ns = f == 0 ? d6 : walk_st.duration_ns - d6;
        memset(&walk_st, 0, offsetof(struct tcpi_family_stats, recvs));   /* counted once */
    }
    return ok;
}

int tcpi_poll(struct tcpi_core *c, struct tcpi_poll_result **out)
{
    c->epoch++;
    reset_result(c);
    drain_destroyed(c);
    if (can_walk_both(c)) {
        int ok = walk_both(c);
        stamp(c);
        drain_destroyed(c);
        sweep(c, ok, ok, now_ns(CLOCK_REALTIME));
        publish(c, out);
        return ok ? 0 : -1;
    }
    if (c->pool.n > 1) {
        for (uint32_t i = 1; i < c->pool.n; i++) {
            struct dumper *d = &c->pool.dumpers[i];
            memset(d->diffed, 0, sizeof(d->diffed));
            d->diff_ok[0] = d->diff_ok[1] = 1;
        }
        pthread_mutex_lock(&c->pool.mu);
        c->pool.job++;
        pthread_cond_broadcast(&c->pool.go);
        pthread_mutex_unlock(&c->pool.mu);
    }
    struct dumper *d0 = &c->pool.dumpers[0];
    int ok[2];
    ok[0] = dump_share(c, d0, 0, own_stats(c, 0), PROCESS);
    drain_destroyed(c);
    ok[1] = dump_share(c, d0, 1, own_stats(c, 1), PROCESS);
    diff_helpers(c, 1);
    stamp(c);   /* before the merge: each thread's own end times */
    for (int f = 0; f < 2; f++) {
        int dumped = !d0->prog[f].skip;
        for (uint32_t i = 1; i < c->pool.n; i++) {
            struct dumper *d = &c->pool.dumpers[i];
            merge_stats(own_stats(c, f), &d->st[f]);
            merge_stats(own_stats(c, f), &d->diffed[f]);
            ok[f] = ok[f] && d->ok[f] && d->diff_ok[f];
            dumped |= !d->prog[f].skip;
        }
        ok[f] = ok[f] && dumped;   /* a family no thread dumped was not seen complete */
    }
    drain_destroyed(c);
    sweep(c, ok[0], ok[1], now_ns(CLOCK_REALTIME));
    publish(c, out);
    return (ok[0] || ok[1]) ? 0 : -1;
}

int tcpi_drain(struct tcpi_core *c, struct tcpi_poll_result **out)
{
    reset_result(c);
    drain_destroyed(c);
    publish(c, out);
    return (int)c->destroyed.n;
}

int tcpi_check_bytecode(struct tcpi_core *c, uint32_t thread, uint8_t family)
{
    struct tcpi_family_stats st;
    int64_t count = 0;
    if (thread >= c->pool.n || (family != AF_INET && family != AF_INET6))
        return EINVAL;
    if (dump(c, &c->pool.dumpers[thread], family, 0, &st, COUNT, &count) == 0)
        return 0;
    return st.errno_value ? st.errno_value : EPROTO;
}

int64_t tcpi_count_dump(struct tcpi_core *c, uint8_t family, int *err)
{
    struct tcpi_family_stats st;
    int64_t count = 0;
    if (family != AF_INET && family != AF_INET6 && family != AF_UNSPEC) {
        *err = EINVAL;
        return -1;
    }
    c->walking_both = family == AF_UNSPEC;
    int rc = dump(c, &c->pool.dumpers[0], family, c->states, &st, COUNT, &count);
    c->walking_both = 0;
    if (rc < 0) {
        *err = st.errno_value ? st.errno_value : EPROTO;
        return -1;
    }
    return count;
}

void tcpi_release_memory(void)
{
    malloc_trim(0);
}
