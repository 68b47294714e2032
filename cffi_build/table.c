/*
 * table.c - the snapshot table (open addressing keyed by cookie) and the result
 * arena that a poll reports into.
 */
#define _GNU_SOURCE
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <stdlib.h>

int table_grow(struct table *t)
{
    uint32_t old_cap = t->cap, ncap = old_cap ? old_cap * 2 : 1024;
    struct entry *old = t->slots, *ns = calloc(ncap, sizeof(*ns));
    if (!ns)
        return -1;
    t->slots = ns;
    t->cap = ncap;
    for (uint32_t i = 0; i < old_cap; i++) {
        if (!old[i].used)
            continue;
        uint32_t j = table_slot(t, old[i].cookie);
        while (ns[j].used)
            j = (j + 1) & (ncap - 1);
        ns[j] = old[i];
    }
    free(old);
    return 0;
}

/* Linear-probing delete with backward shift, so no tombstones accumulate. */
void table_delete_at(struct table *t, uint32_t i)
{
    uint32_t mask = t->cap - 1, j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!t->slots[j].used)
            break;
        uint32_t k = table_slot(t, t->slots[j].cookie);
        int stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
        if (stays)
            continue;
        t->slots[i] = t->slots[j];
        i = j;
    }
    memset(&t->slots[i], 0, sizeof(t->slots[i]));
    t->count--;
}

/* The cookie's entry, created empty (used, LIVE, no data) if it is new. */
struct entry *table_get(struct table *t, uint64_t cookie, int *created)
{
    if ((t->count + 1) * 2 > t->cap && table_grow(t) < 0)
        return NULL;
    struct entry *e = table_find(t, cookie);
    *created = !e->used;
    if (*created) {
        memset(e, 0, sizeof(*e));
        e->used = 1;
        e->cookie = cookie;
        t->count++;
    }
    return e;
}

/* Keeps a copy of the socket's message in its entry. */
int entry_store(struct entry *e, const uint8_t *p, uint32_t n)
{
    if (n > e->cap) {
        uint8_t *nd = realloc(e->data, n);
        if (!nd)
            return -1;
        e->data = nd;
        e->cap = n;
    }
    memcpy(e->data, p, n);
    e->len = n;
    return 0;
}

/* Keeps the image of the socket's message instead (see struct image). */
_Static_assert(sizeof(struct image) == 104, "an image is one 112-byte malloc chunk (README, Memory)");
int entry_store_image(struct entry *e, const struct image *img)
{
    if (!entry_image(e)) {
        uint8_t *nd = malloc(sizeof(*img));
        if (!nd)
            return -1;
        free(e->data);
        e->data = nd;
        e->cap = sizeof(*img);
    }
    memcpy(e->data, img, sizeof(*img));
    e->len = 0;
    return 0;
}

void entry_drop(struct entry *e)
{
    free(e->data);
    e->data = NULL;
    e->len = e->cap = 0;
}

static int arena_put(struct arena *a, const uint8_t *p, uint32_t n, uint32_t *off)
{
    if (a->len + n > a->cap) {
        uint32_t ncap = a->cap ? a->cap : 65536;
        while (ncap < a->len + n)
            ncap *= 2;
        uint8_t *nd = realloc(a->data, ncap);
        if (!nd)
            return -1;
        a->data = nd;
        a->cap = ncap;
    }
    if (n)   /* a close with no message kept has none */
        memcpy(a->data + a->len, p, n);
    *off = a->len;
    a->len += n;
    return 0;
}

int result_add(struct tcpi_core *c, struct recvec *v, const uint8_t *p, uint32_t n,
                  uint64_t cookie, uint8_t family, uint8_t kind, int64_t realtime_ns)
{
    if (v->n == v->cap) {
        uint32_t ncap = v->cap ? v->cap * 2 : 256;
        struct tcpi_record *nv = realloc(v->v, ncap * sizeof(*nv));
        if (!nv)
            return -1;
        v->v = nv;
        v->cap = ncap;
    }
    struct tcpi_record *r = &v->v[v->n];
    if (arena_put(&c->arena, p, n, &r->offset) < 0)
        return -1;
    r->length = n;
    r->cookie = cookie;
    r->realtime_ns = realtime_ns;
    r->family = family;
    r->kind = kind;
    v->n++;
    return 0;
}

int64_t tcpi_snapshot(struct tcpi_core *c, uint64_t cookie, uint8_t *out, uint32_t cap)
{
    const struct entry *e = table_find(&c->tbl, cookie);
    if (!e->used || e->fate != LIVE || !e->data)
        return 0;
    if (entry_image(e))   /* the message itself was not kept: ask the kernel for it now */
        return lookup_message(c, e, out, cap);
    if (e->len > cap)
        return -(int64_t)e->len;
    memcpy(out, e->data, e->len);
    return e->len;
}
