/*
 * remnants.c - the FIN_WAIT2 time-wait remnants of short flows, told apart by
 * their 4-tuple.
 */
#define _GNU_SOURCE
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"


/* A connection that closes first leaves a FIN_WAIT2 time-wait remnant, which takes
 * over the socket's cookie only if one was made while the socket lived: when no
 * dump asked for it, the kernel mints the remnant a cookie of its own when a dump
 * first shows it, and another one for the dying socket's destroy notification (the
 * short flow).  The two then share nothing but the 4-tuple, so the core remembers
 * the 4-tuples of recent short flows (shortflows, keyed by a 64-bit FNV-1a of the
 * family, ports and addresses: a false match needs a lost notification and a
 * collision among the few tuples remembered at once).  Time-wait sockets that
 * appear under a new cookie are held back until their short flow claims them. */
static uint64_t tuple_key(const uint8_t *idm)
{
    uint64_t h = 0xcbf29ce484222325ull;
    h = (h ^ idm_family(idm)) * 0x100000001b3ull;
    for (size_t i = IDM_AT(id.idiag_sport); i < IDM_AT(id.idiag_if); i++)   /* ports, addresses */
        h = (h ^ idm[i]) * 0x100000001b3ull;
    return h;
}

int remember_short(struct tcpi_core *c, const uint8_t *idm)
{
    int created;
    struct entry *e = table_get(&c->shortflows, tuple_key(idm), &created);
    if (!e)
        return -1;
    e->epoch = c->epoch;
    e->since_ns = now_ns(CLOCK_MONOTONIC);
    return 0;
}

int recently_short(struct tcpi_core *c, const uint8_t *idm)
{
    return table_find(&c->shortflows, tuple_key(idm))->used;
}

/* A remnant's short flow is known: ignore the remnant until the dumps lose it. */
void settle_remnant(struct tcpi_core *c, struct entry *e)
{
    entry_drop(e);
    e->fate = REMNANT;
    c->result.destroy.remnants++;
}

/* Forgets the short flows whose remnants have had time to appear: the first dump
 * after the notification shows one, so two polls and twice the grace are plenty. */
void forget_shortflows(struct tcpi_core *c, int64_t now)
{
    struct table *t = &c->shortflows;
    for (uint32_t i = 0; t->count && i < t->cap;) {
        const struct entry *e = &t->slots[i];
        if (e->used && c->epoch - e->epoch >= 2 && now - e->since_ns >= 2 * c->destroy.grace_ns)
            table_delete_at(t, i);   /* slot i now holds a shifted entry: re-examine */
        else
            i++;
    }
}

/* A time-wait socket first seen under a cookie of its own, while destroy
 * notifications are heard.  A recent short flow's remnant is ignored for its whole
 * life; any other is held back, unreported, for the grace (see sweep). */
int hold_timewait(struct tcpi_core *c, const uint8_t *p, uint32_t n, uint64_t cookie)
{
    int created;
    struct entry *e = table_get(&c->tbl, cookie, &created);
    if (!e)
        return -1;
    e->family = idm_family(p);
    e->epoch = c->epoch;
    if (recently_short(c, p)) {
        settle_remnant(c, e);
        return 0;
    }
    if (entry_store(e, p, n) < 0) {
        table_delete_at(&c->tbl, (uint32_t)(e - c->tbl.slots));
        return -1;
    }
    e->fate = HELD;
    e->since_ns = now_ns(CLOCK_REALTIME);
    return 0;
}
