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

int tcpi_compare(const uint8_t *cur, uint32_t n, const uint8_t *prev, uint32_t plen)
{
    uint8_t kind;
    if (n < IDM_LEN || plen < IDM_LEN || diff(cur, n, prev, plen, &kind) < 0)
        return -1;
    return kind;
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

/* Two chains, even and odd words, so that the CPU runs them side by side; each is
 * still a bijection per word, and so is the final step(a, b) in either. */
struct lanes {
    uint64_t a, b;
};

static inline uint64_t lanes_end(struct lanes l)
{
    return hash_step(l.a, l.b);
}

/* The word at v[i] of a value whose bytes end at `end`, zero beyond; `readable` bytes
 * from v belong to the message, so 8 can be read at once and the excess masked off. */
static inline uint64_t word_at(const uint8_t *v, uint32_t readable, uint32_t i, uint32_t end)
{
    uint64_t w = 0;
    if (i >= end)
        return 0;
    uint32_t take = end - i;
    if (i + 8 <= readable) {
        memcpy(&w, v + i, 8);
        return take >= 8 ? w : w & ((1ull << (8 * take)) - 1);   /* little-endian */
    }
    for (uint32_t k = 0; k < take && k < 8; k++)
        w |= (uint64_t)v[i + k] << (8 * k);
    return w;
}

/* Hashes bytes [from, to) of a value of vlen bytes (zero-padded), 8 at a time. */
static void hash_range(struct lanes *l, const uint8_t *v, uint32_t vlen, uint32_t readable,
                       uint32_t from, uint32_t to)
{
    uint32_t end = to < vlen ? to : vlen, i = from;
    for (; i + 8 < to; i += 16) {
        l->a = hash_step(l->a, word_at(v, readable, i, end));
        l->b = hash_step(l->b, word_at(v, readable, i + 8, end));
    }
    if (i < to)
        l->a = hash_step(l->a, word_at(v, readable, i, end));
}

static inline uint64_t load64(const uint8_t *v)
{
    uint64_t w;
    memcpy(&w, v, 8);
    return w;
}

/* The tcp_info bytes Compare reads, as hash_range over [0, COUNTERS_END) and then
 * [STATE_FROM, STATE_END) hashes them, with whole-word loads when the message has
 * the bytes: the one hash every socket of every poll takes. */
_Static_assert(COUNTERS_END == 44 && STATE_FROM == 60 && STATE_END == 168,
               "hash_info's word pattern is that of these offsets");
static inline uint64_t hash_info(const uint8_t *v, uint32_t len, uint32_t readable)
{
    struct lanes l = {1, 2};
    if (len < STATE_END || readable < STATE_END + 4) {
        hash_range(&l, v, len, readable, 0, COUNTERS_END);
        hash_range(&l, v, len, readable, STATE_FROM, STATE_END);
        return lanes_end(l);
    }
    const uint64_t low = 0xFFFFFFFFull;
    for (uint32_t i = 0; i < 32; i += 16) {
        l.a = hash_step(l.a, load64(v + i));
        l.b = hash_step(l.b, load64(v + i + 8));
    }
    l.a = hash_step(l.a, load64(v + 32));
    l.b = hash_step(l.b, load64(v + 40) & low);
    for (uint32_t i = STATE_FROM; i < 156; i += 16) {
        l.a = hash_step(l.a, load64(v + i));
        l.b = hash_step(l.b, load64(v + i + 8));
    }
    l.a = hash_step(l.a, load64(v + 156));
    l.b = hash_step(l.b, load64(v + 164) & low);
    return lanes_end(l);
}

/* An attribute's value, as hash_range over [0, len) hashes it, with whole-word loads. */
static inline void hash_value(struct lanes *l, const uint8_t *v, uint32_t len, uint32_t readable)
{
    uint32_t words = (len + 7) / 8;
    if (readable < words * 8) {
        hash_range(l, v, len, readable, 0, len);
        return;
    }
    for (uint32_t k = 0; k < words; k++) {
        uint64_t w = load64(v + 8 * k);
        if (k == words - 1 && (len & 7))
            w &= (1ull << (8 * (len & 7))) - 1;
        if (k & 1)
            l->b = hash_step(l->b, w);
        else
            l->a = hash_step(l->a, w);
    }
}

/* What Compare needs of a message (see struct image), in one walk of its attributes
 * in the kernel's order (the same for every message of a socket).  Returns -1 if it
 * is malformed, as parse_attrs. */
int image_make(const uint8_t *p, uint32_t n, struct image *img)
{
    if (n < IDM_LEN)
        return -1;
    memset(img, 0, sizeof(*img));
    img->family = idm_family(p);
    img->state = idm_state(p);
    memcpy(&img->id, p + IDM_AT(id), sizeof(img->id));
    struct lanes attrs = {1, 2};
    uint64_t shape = 1;
    uint32_t at = IDM_LEN, maxtype = 0, off, len;
    uint16_t rtype;
    int got;
    while ((got = next_attr(p, n, &at, &rtype, &off, &len)) > 0) {
        if (rtype > maxtype)
            maxtype = rtype;
        const uint8_t *v = p + off;
        uint32_t readable = n - off;
        if (rtype > MAX_SLOT)
            continue;
        img->present |= 1ull << rtype;
        if (rtype == INET_DIAG_INFO) {   /* a duplicate replaces it, as the last wins */
            img->info = hash_info(v, len, readable);
            img->counters = len >= COUNTS_END;
            if (img->counters) {
                memcpy(&img->sent, v + SENT_AT, 8);
                memcpy(&img->received, v + RECEIVED_AT, 8);
            }
            continue;
        }
        /* Values alone: with the same shape they sit at the same places of one sequence. */
        shape = hash_step(shape, (uint64_t)rtype << 32 | len);
        hash_value(&attrs, v, len, readable);
    }
    if (got < 0)
        return -1;
    img->nslots = (uint8_t)((maxtype > MAX_SLOT ? MAX_SLOT : maxtype) + 1);
    img->attrs = lanes_end(attrs);
    img->shape = shape;
    return 0;
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
