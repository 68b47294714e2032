/*
 * lookup.c - the fast tier: the active connections looked up exactly, one socket at a
 * time by its id and cookie (SOCK_DIAG_BY_FAMILY without NLM_F_DUMP), between sweeps.
 * A look-up costs a few microseconds whatever the size of the kernel's table, so the
 * connections that move are followed at the poll interval while the table is walked
 * seldom.  A connection joins when a sweep finds it new or changed (poll.c) and leaves
 * after a run of look-ups that found nothing changed, or when a look-up misses it.
 */
#define _GNU_SOURCE
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <errno.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

/* What became of one look-up. */
enum outcome { PENDING = 0, CHANGED, UNCHANGED, MISSING, BAD };

struct lookup_req {
    struct nlmsghdr nh;
    struct inet_diag_req_v2 req;
};

int tier_join(struct tcpi_core *c, struct entry *e)
{
    struct tier *t = &c->tier;
    if (t->n == t->cap) {
        uint32_t ncap = t->cap ? t->cap * 2 : 256;
        struct active *nv = realloc(t->v, ncap * sizeof(*nv));
        if (!nv)
            return -1;
        t->v = nv;
        t->cap = ncap;
    }
    t->v[t->n++] = (struct active){e->cookie, 0};
    e->active = 1;
    c->result.joined++;
    return 0;
}

void tier_free(struct tcpi_core *c)
{
    free(c->tier.v);
    free(c->tier.buf);
    memset(&c->tier, 0, sizeof(c->tier));
}

void tcpi_set_fast_tier(struct tcpi_core *c, uint32_t idle_lookups)
{
    struct tier *t = &c->tier;
    t->idle_lookups = idle_lookups;
    if (idle_lookups)
        return;
    for (uint32_t i = 0; i < t->n; i++) {
        struct entry *e = table_find(&c->tbl, t->v[i].cookie);
        if (e->used)
            e->active = 0;
    }
    t->n = 0;
}

static void fail(struct tcpi_lookup_stats *ls, int32_t status, int32_t errno_value)
{
    if (!ls->status) {
        ls->status = status;
        ls->errno_value = errno_value;
    }
}

/* One answer: a message for look-up i, or the kernel's error for it.  Returns 1 if it
 * settled one of the batch's look-ups, 0 for a datagram that is no answer of ours. */
static int on_answer(struct tcpi_core *c, const uint8_t *b, uint32_t n, uint32_t base,
                      const struct active *items, uint32_t k, uint8_t *outcome)
{
    const struct nlmsghdr *h = (const struct nlmsghdr *)b;
    struct tcpi_lookup_stats *ls = &c->result.lookup;
    if (n < sizeof(*h) || h->nlmsg_len > n || h->nlmsg_len < sizeof(*h)) {
        ls->bad++;
        return 0;
    }
    uint32_t i = h->nlmsg_seq - base;
    if (i >= k || outcome[i] != PENDING || h->nlmsg_pid != c->pool.dumpers[0].port_id) {
        ls->bad++;   /* not one of this batch's answers (a stale reply) */
        return 0;
    }
    const uint8_t *p = b + sizeof(*h);
    uint32_t plen = h->nlmsg_len - sizeof(*h);
    if (h->nlmsg_type == NLMSG_ERROR) {
        int32_t code = 0;
        if (plen >= 4)
            memcpy(&code, p, 4);
        outcome[i] = code == -ENOENT ? MISSING : BAD;
        if (code != -ENOENT)
            fail(ls, TCPI_E_NLMSG_ERROR, -code);
        return 1;
    }
    if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY || plen < IDM_LEN || idm_cookie(p) != items[i].cookie) {
        outcome[i] = BAD;
        return 1;
    }
    /* A state the sweeps do not ask for (TIME_WAIT, say): the connection has ended as
     * far as the sweeps are concerned, and its destroy notification or the next sweep
     * says so; here it only leaves the tier. */
    if (!((1u << idm_state(p)) & c->states)) {
        outcome[i] = MISSING;
        return 1;
    }
    struct tcpi_family_stats scratch;
    memset(&scratch, 0, sizeof(scratch));
    uint32_t before = c->changed.n;
    if (take_message(c, p, plen, &scratch) < 0) {
        fail(ls, TCPI_E_NOMEM, ENOMEM);
        outcome[i] = BAD;
        return 1;
    }
    outcome[i] = c->changed.n > before ? CHANGED : UNCHANGED;
    return 1;
}

/* The look-up of one connection (LIVE, with a message or image kept). */
static void fill_request(const struct tcpi_core *c, const struct entry *e, struct lookup_req *r,
                         uint32_t seq)
{
    memset(r, 0, sizeof(*r));
    r->nh.nlmsg_len = sizeof(*r);
    r->nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    r->nh.nlmsg_flags = NLM_F_REQUEST;
    r->nh.nlmsg_seq = seq;
    r->req.sdiag_family = entry_family(e);
    r->req.sdiag_protocol = IPPROTO_TCP;
    r->req.idiag_ext = c->ext;
    r->req.idiag_states = c->states;
    memcpy(&r->req.id, entry_id(e), sizeof(r->req.id));
}

/* The connection's message as the kernel has it now, for a query (the table keeps
 * only its image): its length; 0 if the kernel no longer has it or the look-up
 * failed; -(its length) if it does not fit cap.  The poll thread's socket, between
 * polls; nothing in the table changes. */
int64_t lookup_message(struct tcpi_core *c, const struct entry *e, uint8_t *out, uint32_t cap)
{
    struct dumper *d = &c->pool.dumpers[0];
    struct lookup_req r;
    uint8_t buf[LOOKUP_BUF];
    fill_request(c, e, &r, ++d->seq);
    struct iovec iov = {&r, sizeof(r)};
    if (send_iov(d, &iov, 1, sizeof(r)) < 0)
        return 0;
    for (;;) {
        ssize_t got = recv(d->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (got < 0 && errno == EINTR)
            continue;
        const struct nlmsghdr *h = (const struct nlmsghdr *)buf;
        if (got < (ssize_t)sizeof(*h) || h->nlmsg_len > (size_t)got || h->nlmsg_len < sizeof(*h)) {
            reset_socket(d);   /* nothing, or something broken: start clean */
            return 0;
        }
        if (h->nlmsg_seq != r.nh.nlmsg_seq)
            continue;          /* a stale answer */
        const uint8_t *p = buf + sizeof(*h);
        uint32_t plen = h->nlmsg_len - sizeof(*h);
        if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY || plen < IDM_LEN || idm_cookie(p) != e->cookie)
            return 0;          /* ENOENT: gone meanwhile */
        if (plen > cap)
            return -(int64_t)plen;
        memcpy(out, p, plen);
        return plen;
    }
}

/* Sends the look-ups of k active connections (all LIVE with a stored message) in
 * one datagram and handles their k answers.  Returns -1 if the socket failed. */
static int lookup_batch(struct tcpi_core *c, const struct active *items, uint32_t k,
                        uint8_t *outcome)
{
    struct dumper *d = &c->pool.dumpers[0];
    struct tcpi_lookup_stats *ls = &c->result.lookup;
    struct lookup_req reqs[LOOKUP_BATCH];
    uint32_t base = d->seq + 1;
    for (uint32_t i = 0; i < k; i++)
        fill_request(c, table_find(&c->tbl, items[i].cookie), &reqs[i], ++d->seq);
    struct iovec iov = {reqs, k * sizeof(reqs[0])};
    if (send_iov(d, &iov, 1, iov.iov_len) < 0) {
        fail(ls, TCPI_E_SYSCALL, errno);
        return -1;
    }
    ls->sends++;
    ls->asked += k;
    /* The kernel answers each look-up while sendmsg runs, one datagram each. */
    for (uint32_t answered = 0; answered < k;) {
        struct mmsghdr mm[LOOKUP_BATCH];
        struct iovec iv[LOOKUP_BATCH];
        uint32_t want = k - answered;
        memset(mm, 0, want * sizeof(mm[0]));
        for (uint32_t j = 0; j < want; j++) {
            iv[j] = (struct iovec){c->tier.buf + (size_t)j * LOOKUP_BUF, LOOKUP_BUF};
            mm[j].msg_hdr.msg_iov = &iv[j];
            mm[j].msg_hdr.msg_iovlen = 1;
        }
        int got = recvmmsg(d->fd, mm, want, MSG_WAITFORONE, NULL);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            fail(ls, TCPI_E_SYSCALL, got < 0 ? errno : EPROTO);
            return -1;
        }
        for (int j = 0; j < got; j++) {
            if (mm[j].msg_hdr.msg_flags & MSG_TRUNC) {
                fail(ls, TCPI_E_TRUNCATED, EMSGSIZE);
                return -1;
            }
            answered += (uint32_t)on_answer(c, c->tier.buf + (size_t)j * LOOKUP_BUF,
                                            mm[j].msg_len, base, items, k, outcome);
        }
    }
    return 0;
}

int tcpi_refresh(struct tcpi_core *c, struct tcpi_poll_result **out)
{
    int64_t t0 = now_ns(CLOCK_MONOTONIC);
    struct tier *t = &c->tier;
    struct tcpi_lookup_stats *ls = &c->result.lookup;
    reset_result(c);
    drain_destroyed(c);   /* the connections that died are not looked up */
    if (t->n && !t->buf && !(t->buf = malloc((size_t)LOOKUP_BATCH * LOOKUP_BUF)))
        fail(ls, TCPI_E_NOMEM, ENOMEM);
    int failed = ls->status != 0;
    uint32_t kept = 0;
    for (uint32_t i = 0; i < t->n;) {
        struct active batch[LOOKUP_BATCH];
        uint8_t outcome[LOOKUP_BATCH] = {0};
        uint32_t k = 0;
        while (i < t->n && k < LOOKUP_BATCH) {
            struct active a = t->v[i++];
            struct entry *e = table_find(&c->tbl, a.cookie);
            if (e->used && e->fate == LIVE && e->data) {
                batch[k++] = a;
            } else {   /* closed meanwhile, or gone from the table */
                if (e->used)
                    e->active = 0;
                ls->left++;
            }
        }
        if (k && !failed && lookup_batch(c, batch, k, outcome) < 0) {
            failed = 1;
            reset_socket(&c->pool.dumpers[0]);   /* drop answers still queued */
        }
        for (uint32_t j = 0; j < k; j++) {
            struct entry *e = table_find(&c->tbl, batch[j].cookie);
            int leaves = 0;
            if (outcome[j] == CHANGED) {
                ls->changed++;
                batch[j].idle = 0;
            } else if (outcome[j] == UNCHANGED) {
                ls->unchanged++;
                leaves = ++batch[j].idle >= t->idle_lookups;
            } else if (outcome[j] == MISSING) {
                ls->missing++;
                leaves = 1;
            } else if (outcome[j] == BAD) {
                ls->bad++;
            }
            if (leaves) {
                e->active = 0;
                ls->left++;
            } else {
                t->v[kept++] = batch[j];
            }
        }
    }
    t->n = kept;
    ls->end_realtime_ns = now_ns(CLOCK_REALTIME);
    for (uint32_t i = 0; i < c->changed.n; i++)
        c->changed.v[i].realtime_ns = ls->end_realtime_ns;
    drain_destroyed(c);
    ls->duration_ns = now_ns(CLOCK_MONOTONIC) - t0;
    publish(c, out);
    return failed ? -1 : 0;
}
