/*
 * message.c - one inet_diag message: its attributes in upstream's slots, and
 * upstream's Compare of two messages of one socket (UPSTREAM.md 3.3).
 */
#define _GNU_SOURCE
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <linux/tcp.h>

/* The tcp_info bytes upstream's Compare reads: those before the last_* timers, and
 * those from pmtu up to busy_time (UPSTREAM.md 3.3). */
#define COUNTERS_END offsetof(struct tcp_info, tcpi_last_data_sent)
#define STATE_FROM offsetof(struct tcp_info, tcpi_pmtu)
#define STATE_END offsetof(struct tcp_info, tcpi_busy_time)

/* Reads the rtattr at *at of a message: its type, and its value's offset and length;
 * moves *at past it.  Returns 1, 0 at the end of the message, -1 if malformed. */
static inline int next_attr(const uint8_t *p, uint32_t n, uint32_t *at, uint16_t *type,
                            uint32_t *off, uint32_t *len)
{
    uint32_t pos = *at;
    uint16_t rlen;
    if (pos >= n || n - pos < 4)
        return 0;
    memcpy(&rlen, p + pos, 2);
    memcpy(type, p + pos + 2, 2);
    if (rlen < 4 || rlen > n - pos)
        return -1;
    *off = pos + 4;
    *len = rlen - 4u;
    *at = pos + ((rlen + 3u) & ~3u);
    return 1;
}

/* Splits the bytes after the inet_diag_msg into slots as upstream does: the last
 * duplicate wins, types above 38 are dropped.  Returns -1 on a malformed rtattr
 * (upstream's EINVAL: the whole record is rejected). */
int parse_attrs(const uint8_t *p, uint32_t n, struct attrs *a)
{
    uint32_t at = IDM_LEN, maxtype = 0, off, len;
    uint16_t rtype;
    int got;
    memset(a->present, 0, sizeof(a->present));
    while ((got = next_attr(p, n, &at, &rtype, &off, &len)) > 0) {
        if (rtype > maxtype)
            maxtype = rtype;
        if (rtype <= MAX_SLOT) {
            a->present[rtype] = 1;
            a->off[rtype] = (uint16_t)off;
            a->len[rtype] = (uint16_t)len;
        }
    }
    if (got < 0)
        return -1;
    a->nslots = (int)(maxtype > MAX_SLOT ? MAX_SLOT : maxtype) + 1;
    return 0;
}

/* Compares INFO bytes [from, to) with both sides zero-padded, as upstream's
 * comparison of short (old-kernel) tcp_info behaves on modern kernels. */
static int info_range_differs(const uint8_t *a, uint32_t alen, const uint8_t *b,
                              uint32_t blen, uint32_t from, uint32_t to)
{
    for (uint32_t i = from; i < to; i++) {
        uint8_t x = i < alen ? a[i] : 0, y = i < blen ? b[i] : 0;
        if (x != y)
            return 1;
    }
    return 0;
}

static int range_differs(const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen,
                         uint32_t from, uint32_t to)
{
    if (alen >= to && blen >= to)
        return memcmp(a + from, b + from, to - from) != 0;
    return info_range_differs(a, alen, b, blen, from, to);
}

/* Upstream's Compare(current, previous), with one fix: a socket that had no
 * tcp_info last poll and still has none (a FIN_WAIT2 time-wait socket) is not a
 * change, so the loss of tcp_info is recorded once instead of on every poll. */
static uint8_t compare(const uint8_t *cur, uint32_t clen, const struct attrs *ca,
                       const uint8_t *prev, uint32_t plen, const struct attrs *pa)
{
    if (idm_state(cur) != idm_state(prev))
        return TCPI_STATE_CHANGE;
    int c_info = ca->nslots > INET_DIAG_INFO && ca->present[INET_DIAG_INFO];
    int p_info = pa->nslots > INET_DIAG_INFO && pa->present[INET_DIAG_INFO];
    if (c_info != p_info)
        return TCPI_NO_TCPINFO;
    if (c_info) {
        const uint8_t *ci = cur + ca->off[INET_DIAG_INFO], *pi = prev + pa->off[INET_DIAG_INFO];
        uint32_t cl = ca->len[INET_DIAG_INFO], pl = pa->len[INET_DIAG_INFO];
        if (range_differs(ci, cl, pi, pl, STATE_FROM, STATE_END) ||
            range_differs(ci, cl, pi, pl, 0, COUNTERS_END))
            return TCPI_STATE_OR_COUNTER;
    }
    if (pa->nslots < ca->nslots)
        return TCPI_NEW_ATTRIBUTE;
    if (pa->nslots > ca->nslots)
        return TCPI_LOST_ATTRIBUTE;
    for (int t = 0; t < ca->nslots; t++) {
        if (t == INET_DIAG_INFO)
            continue;
        if (!pa->present[t] && ca->present[t])
            return TCPI_NEW_ATTRIBUTE;
        if (pa->present[t] && !ca->present[t])
            return TCPI_LOST_ATTRIBUTE;
        if (!ca->present[t])
            continue;
        if (pa->len[t] != ca->len[t])
            return TCPI_ATTRIBUTE_LENGTH;
        if (memcmp(cur + ca->off[t], prev + pa->off[t], ca->len[t]) != 0)
            return TCPI_OTHER;
    }
    return TCPI_NO_CHANGE;
}

/* The common case of an idle socket: same length and the same attribute headers
 * at the same offsets as last poll.  Compare then reduces to one walk over both
 * copies: state, the two tcp_info ranges, and every other attribute's bytes.
 * Returns 0 (take the general path) when the layouts differ or anything is odd. */
static int compare_same_layout(const uint8_t *cur, uint32_t n, const uint8_t *prev, uint32_t plen,
                               uint8_t *kind)
{
    if (n != plen)
        return 0;
    int counters = 0, other = 0;
    uint32_t pos = IDM_LEN;
    while (pos < n && n - pos >= 4) {
        uint16_t rlen, rtype;
        if (memcmp(cur + pos, prev + pos, 4) != 0)
            return 0;
        memcpy(&rlen, cur + pos, 2);
        memcpy(&rtype, cur + pos + 2, 2);
        if (rlen < 4 || rlen > n - pos || rtype > MAX_SLOT)
            return 0;
        const uint8_t *cv = cur + pos + 4, *pv = prev + pos + 4;
        uint32_t vlen = rlen - 4u;
        if (rtype == INET_DIAG_INFO)
            counters |= range_differs(cv, vlen, pv, vlen, STATE_FROM, STATE_END) ||
                        range_differs(cv, vlen, pv, vlen, 0, COUNTERS_END);
        else if (!other)
            other = memcmp(cv, pv, vlen) != 0;
        pos += (rlen + 3u) & ~3u;
    }
    *kind = idm_state(cur) != idm_state(prev) ? TCPI_STATE_CHANGE
          : counters ? TCPI_STATE_OR_COUNTER
          : other ? TCPI_OTHER : TCPI_NO_CHANGE;
    return 1;
}

/* Upstream's Compare of a message with the previous one of the same socket (the
 * stored copy is known to be well formed).  Returns -1 if cur is malformed. */
int diff(const uint8_t *cur, uint32_t n, const uint8_t *prev, uint32_t plen, uint8_t *kind)
{
    struct attrs ca, pa;
    if (compare_same_layout(cur, n, prev, plen, kind))
        return 0;
    if (parse_attrs(cur, n, &ca) < 0 || parse_attrs(prev, plen, &pa) < 0)
        return -1;
    *kind = compare(cur, n, &ca, prev, plen, &pa);
    return 0;
}

#define SENT_AT offsetof(struct tcp_info, tcpi_bytes_sent)
#define RECEIVED_AT offsetof(struct tcp_info, tcpi_bytes_received)
#define COUNTS_END (SENT_AT + 8 > RECEIVED_AT + 8 ? SENT_AT + 8 : RECEIVED_AT + 8)

/* One step of an image's hash: a bijection of h for each word, so that two sequences
 * of the same length that differ in one word always hash apart. */
static inline uint64_t hash_step(uint64_t h, uint64_t w)
{
    h = (h ^ w) * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 29);
}

/* Four chains, word k of a block in chain k % 4, so that the CPU runs them side by
 * side; each is still a bijection per word, and so is the final fold of the four. */
struct lanes {
    uint64_t h[4];
};

static inline uint64_t lanes_end(struct lanes l)
{
    return hash_step(hash_step(hash_step(l.h[0], l.h[1]), l.h[2]), l.h[3]);
}

static inline uint64_t load64(const uint8_t *v)
{
    uint64_t w;
    memcpy(&w, v, 8);
    return w;
}

/* The word of the `avail` (1 and up) bytes at v, zero-padded if fewer than 8: one load,
 * of the 8 bytes that end at the last of them (the 8 before v are readable too). */
static inline uint64_t tail_word(const uint8_t *v, uint32_t avail)
{
    return avail >= 8 ? load64(v) : load64(v + avail - 8) >> (64 - 8 * avail);   /* little-endian */
}

/* Hashes the len bytes at v, 8 at a time, the last word zero-padded: never a byte beyond
 * v + len, and none before v but the 8 that the message (or its copy) has there. */
static inline void hash_block(struct lanes *l, const uint8_t *v, uint32_t len)
{
    uint64_t a = l->h[0], b = l->h[1], c = l->h[2], d = l->h[3];
    uint32_t i = 0;
    for (; i + 32 <= len; i += 32) {
        a = hash_step(a, load64(v + i));
        b = hash_step(b, load64(v + i + 8));
        c = hash_step(c, load64(v + i + 16));
        d = hash_step(d, load64(v + i + 24));
    }
    if (i < len)
        a = hash_step(a, tail_word(v + i, len - i));
    if (i + 8 < len)
        b = hash_step(b, tail_word(v + i + 8, len - i - 8));
    if (i + 16 < len)
        c = hash_step(c, tail_word(v + i + 16, len - i - 16));
    l->h[0] = a, l->h[1] = b, l->h[2] = c, l->h[3] = d;
}

/* The tcp_info bytes Compare reads, [0, COUNTERS_END) and [STATE_FROM, STATE_END),
 * of a value zero-padded to STATE_END (an old kernel's shorter tcp_info). */
static inline uint64_t hash_info(const uint8_t *v, uint32_t len)
{
    uint8_t padded[STATE_END];
    if (len < STATE_END) {
        memset(padded, 0, sizeof(padded));
        memcpy(padded, v, len);
        v = padded;
    }
    struct lanes l = {{1, 2, 3, 4}};
    hash_block(&l, v, COUNTERS_END);
    hash_block(&l, v + STATE_FROM, STATE_END - STATE_FROM);
    return lanes_end(l);
}

/* The hash of every byte after the inet_diag_msg but [from, to), the tcp_info attribute
 * (from = to = n: none): the other attributes as they lie, headers and padding included. */
static inline uint64_t hash_around(const uint8_t *p, uint32_t n, uint32_t from, uint32_t to)
{
    struct lanes l = {{1, 2, 3, 4}};
    hash_block(&l, p + IDM_LEN, from - IDM_LEN);
    hash_block(&l, p + to, n - to);
    return lanes_end(l);
}

/* What Compare needs of a message (see struct image), in one walk of its attributes
 * in the kernel's order (the same for every message of a socket), then one hash of
 * the bytes around the (last) tcp_info attribute as they lie: the other attributes,
 * headers and padding included.  Returns -1 if it is malformed, as parse_attrs. */
int image_make(const uint8_t *p, uint32_t n, struct image *img)
{
    if (n < IDM_LEN)
        return -1;
    uint64_t present = 0, shape = 1;
    uint32_t at = IDM_LEN, maxtype = 0, off, len, info_from = n, info_to = n, info_len = 0;
    uint16_t rtype;
    int got;
    while ((got = next_attr(p, n, &at, &rtype, &off, &len)) > 0) {
        if (rtype > maxtype)
            maxtype = rtype;
        if (rtype > MAX_SLOT)
            continue;
        present |= 1ull << rtype;
        if (rtype == INET_DIAG_INFO) {   /* a duplicate replaces it, as the last wins */
            info_from = off - 4;
            info_to = at < n ? at : n;
            info_len = len;
        } else {   /* a bijection of shape per header, cheaper than hash_step */
            shape = shape * 0x9E3779B97F4A7C15ull + ((uint64_t)rtype << 32 | len);
        }
    }
    if (got < 0)
        return -1;
    img->info = img->sent = img->received = img->counters = 0;
    if (present >> INET_DIAG_INFO & 1) {
        const uint8_t *info = p + info_from + 4;
        img->info = hash_info(info, info_len);
        img->counters = info_len >= COUNTS_END;
        if (img->counters) {
            memcpy(&img->sent, info + SENT_AT, 8);
            memcpy(&img->received, info + RECEIVED_AT, 8);
        }
    }
    img->attrs = hash_around(p, n, info_from, info_to);
    img->shape = (uint32_t)(shape ^ shape >> 32);
    img->present = present;
    memcpy(&img->id, p + IDM_AT(id), sizeof(img->id));
    img->family = idm_family(p);
    img->state = idm_state(p);
    img->nslots = (uint8_t)((maxtype > MAX_SLOT ? MAX_SLOT : maxtype) + 1);
    img->len = n;
    img->info_at = img->info_len = 0;
    if ((present >> INET_DIAG_INFO & 1) && n <= UINT16_MAX) {
        img->info_at = (uint16_t)info_from;
        img->info_len = (uint16_t)info_len;
    }
    return 0;
}

/* image_make and image_compare in one, without a walk of p's attributes, when p is laid
 * out as prev's message was: the same length and state, tcp_info where it was with the
 * same length, and the same bytes around it (attribute headers included), so that a walk
 * would find what it found last time.  Most polls of an idle socket take this.  Returns 0
 * when that is not so (take image_make), else 1 with *kind; on a change, *img is then p's
 * image: prev's, with p's tcp_info hash, counters and id. */
int image_same_layout(const uint8_t *p, uint32_t n, const struct image *prev, struct image *img,
                      uint8_t *kind)
{
    uint16_t header[2];
    uint32_t from = prev->info_at, to = from + ((prev->info_len + 7u) & ~3u);
    if (n != prev->len || !from || idm_state(p) != prev->state)
        return 0;
    memcpy(header, p + from, 4);
    if (header[0] != prev->info_len + 4u || header[1] != INET_DIAG_INFO)
        return 0;
    if (hash_around(p, n, from, to < n ? to : n) != prev->attrs)
        return 0;
    const uint8_t *info = p + from + 4;
    uint64_t hash = hash_info(info, prev->info_len);
    if (hash == prev->info) {
        *kind = TCPI_NO_CHANGE;
        return 1;
    }
    *kind = TCPI_STATE_OR_COUNTER;
    *img = *prev;
    img->info = hash;
    if (img->counters) {
        memcpy(&img->sent, info + SENT_AT, 8);
        memcpy(&img->received, info + RECEIVED_AT, 8);
    }
    memcpy(&img->id, p + IDM_AT(id), sizeof(img->id));
    return 1;
}

/* Upstream's Compare(current, previous) on two images: as compare() above, but for
 * the order of the per-slot kinds (see struct image). */
uint8_t image_compare(const struct image *cur, const struct image *prev)
{
    const uint64_t info = 1ull << INET_DIAG_INFO;
    if (cur->state != prev->state)
        return TCPI_STATE_CHANGE;
    if ((cur->present ^ prev->present) & info)
        return TCPI_NO_TCPINFO;
    if ((cur->present & info) && cur->info != prev->info)
        return TCPI_STATE_OR_COUNTER;
    if (prev->nslots < cur->nslots)
        return TCPI_NEW_ATTRIBUTE;
    if (prev->nslots > cur->nslots)
        return TCPI_LOST_ATTRIBUTE;
    uint64_t moved = cur->present ^ prev->present;
    if (moved)
        return (cur->present & moved & -moved) ? TCPI_NEW_ATTRIBUTE : TCPI_LOST_ATTRIBUTE;
    if (cur->shape != prev->shape)
        return TCPI_ATTRIBUTE_LENGTH;
    return cur->attrs != prev->attrs ? TCPI_OTHER : TCPI_NO_CHANGE;
}

/* Adds what a reported record moved to the poll's byte counts: its bytes_sent and
 * bytes_received less those of the connection's previous record (none: a new
 * connection, counted from zero).  A record without those counters adds nothing, and
 * neither does one whose previous record had none (a socket seen as a time-wait
 * remnant before its final record): its bytes were counted up to its last tcp_info. */
/* Where a message's tcp_info is, in upstream's slot (the last duplicate wins), if it
 * holds both byte counters; 0 if not. */
static uint32_t counters_at(const uint8_t *p, uint32_t n)
{
    struct attrs a;
    if (parse_attrs(p, n, &a) < 0 || a.nslots <= INET_DIAG_INFO || !a.present[INET_DIAG_INFO] ||
        a.len[INET_DIAG_INFO] < COUNTS_END)
        return 0;
    return a.off[INET_DIAG_INFO];
}

void count_bytes(struct tcpi_core *c, const uint8_t *cur, uint32_t n, const struct entry *prev)
{
    uint32_t off = counters_at(cur, n), poff = 0;
    uint64_t sent, received, old_sent = 0, old_received = 0;
    if (prev && !prev->data)
        prev = NULL;   /* an entry with nothing kept yet: counted from zero */
    const struct image *img = prev ? entry_image(prev) : NULL;
    if (!off)
        return;
    if (img) {
        if (!img->counters)
            return;
        old_sent = img->sent;
        old_received = img->received;
    } else if (prev) {
        if (!(poff = counters_at(prev->data, prev->len)))
            return;
        memcpy(&old_sent, prev->data + poff + SENT_AT, 8);
        memcpy(&old_received, prev->data + poff + RECEIVED_AT, 8);
    }
    memcpy(&sent, cur + off + SENT_AT, 8);
    memcpy(&received, cur + off + RECEIVED_AT, 8);
    c->result.bytes_sent += sent > old_sent ? sent - old_sent : 0;
    c->result.bytes_received += received > old_received ? received - old_received : 0;
}

void tcpi_layout(struct tcpi_layout *out)
{
    out->idm_len = IDM_LEN;
    out->idm_family = IDM_AT(idiag_family);
    out->idm_state = IDM_AT(idiag_state);
    out->idm_timer = IDM_AT(idiag_timer);
    out->idm_sport = IDM_AT(id.idiag_sport);
    out->idm_dport = IDM_AT(id.idiag_dport);
    out->idm_src = IDM_AT(id.idiag_src);
    out->idm_dst = IDM_AT(id.idiag_dst);
    out->idm_if = IDM_AT(id.idiag_if);
    out->idm_cookie = IDM_AT(id.idiag_cookie);
    out->max_slot = MAX_SLOT;
    out->info_type = INET_DIAG_INFO;
    out->compared[0] = 0;
    out->compared[1] = COUNTERS_END;
    out->compared[2] = STATE_FROM;
    out->compared[3] = STATE_END;
}

int tcpi_compare(const uint8_t *cur, uint32_t n, const uint8_t *prev, uint32_t plen, int by)
{
    struct image was, now;
    uint8_t kind;
    if (n < IDM_LEN || plen < IDM_LEN)
        return -1;
    if (!by)
        return diff(cur, n, prev, plen, &kind) < 0 ? -1 : kind;
    if (image_make(prev, plen, &was) < 0)
        return -1;
    if (by == 1 && image_same_layout(cur, n, &was, &now, &kind))
        return kind;
    return image_make(cur, n, &now) < 0 ? -1 : image_compare(&now, &was);
}
