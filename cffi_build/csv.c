/*
 * csv.c - csvtool's hot loop: archive lines to rows of upstream's CSV
 * (UPSTREAM.md 7), exactly as tcpinfo/csvtool/upstream.py's reference converter
 * prints them.
 *
 * Only the line shape that Go's encoder (and ours) writes is converted here:
 *   {"Timestamp":"<RFC 3339>","RawIDM":"<base64>","Attributes":[null,"<base64>",...]}
 * with "Attributes" also allowed to be absent or null.  Anything else is
 * declined: the Metadata header line, whitespace, escapes, other keys, a
 * timestamp that Go would print differently, base64 that is not plainly
 * padded, a short RawIDM, a CONG name that would need quoting.  The loop stops
 * before such a line and Python converts it, or reports it with file and line.
 * So C never has to get an edge case right, only to recognise it.
 *
 * Which attribute goes in which columns (member formats, absent text) comes
 * from Python in a tcpi_csv_schema, so the field tables live in one place.
 */
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <string.h>
#include <sys/socket.h>

#define MAX_STRUCT 512   /* bytes a STRUCT group may read (Python keeps formats shorter) */
#define MAX_CONG 64      /* longer CONG values are declined */
#define IDM_MAX 256      /* the 15 IDM columns; two IPv6 addresses dominate */
#define INT_MAX_CHARS 21 /* "-9223372036854775808" plus a comma */

/* ---- writing the row ---------------------------------------------------- */

static char *put_u64(char *p, uint64_t v)
{
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static char *put_s64(char *p, int64_t v)
{
    if (v >= 0)
        return put_u64(p, (uint64_t)v);
    *p++ = '-';
    return put_u64(p, 0 - (uint64_t)v);
}

static char *put_hex(char *p, uint64_t v, const char *digits16)
{
    char tmp[16];
    int n = 0;
    do {
        tmp[n++] = digits16[v & 15];
        v >>= 4;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static char *put_text(char *p, const char *text)
{
    size_t n = strlen(text);
    memcpy(p, text, n);
    return p + n;
}

static uint64_t le(const uint8_t *b, int size)
{
    uint64_t v = 0;
    while (size--)
        v = v << 8 | b[size];
    return v;
}

static uint32_t be32(const uint8_t *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static char *put_dotted(char *p, const uint8_t *a)
{
    for (int i = 0; i < 4; i++) {
        if (i)
            *p++ = '.';
        p = put_u64(p, a[i]);
    }
    return p;
}

/* Go's net.IP.String() of a 16-byte inet_diag address, read by the socket's
 * family as inetdiag.ip_string does: dotted quad for IPv4 and v4-mapped, else
 * RFC 5952 with the first longest run of two or more zero groups as "::". */
static char *put_ip(char *p, const uint8_t *a, uint8_t family)
{
    static const uint8_t v4_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    static const uint8_t zeros[12] = {0};
    int best = -1, best_len = 0, run = -1;
    uint16_t g[8];
    if (family != AF_INET6 && (family == AF_INET || memcmp(a + 4, zeros, 12) == 0))
        return put_dotted(p, a);
    if (memcmp(a, v4_mapped, 12) == 0)
        return put_dotted(p, a + 12);
    for (int i = 0; i <= 8; i++) {
        if (i < 8) {
            g[i] = (uint16_t)(a[2 * i] << 8 | a[2 * i + 1]);
            if (g[i] == 0) {
                if (run < 0)
                    run = i;
                continue;
            }
        }
        if (run >= 0 && i - run > best_len) {
            best = run;
            best_len = i - run;
        }
        run = -1;
    }
    if (best_len < 2)
        best = -1;
    for (int i = 0; i < 8; i++) {
        if (i == best) {
            *p++ = ':';
            *p++ = ':';
            i += best_len - 1;
            continue;
        }
        if (i && (best < 0 || i != best + best_len))
            *p++ = ':';
        p = put_hex(p, g[i], "0123456789abcdef");
    }
    return p;
}

/* family,state,timer,retrans,sport,dport,src,dst,interface(big-endian),cookie(%X),
 * expires,rqueue,wqueue,uid,inode - as upstream prints the inet_diag_msg. */
static char *put_idm(char *p, const uint8_t *m)
{
    for (size_t i = IDM_AT(idiag_family); i <= IDM_AT(idiag_retrans); i++) {
        p = put_u64(p, m[i]);
        *p++ = ',';
    }
    p = put_u64(p, idm_sport(m));
    *p++ = ',';
    p = put_u64(p, idm_dport(m));
    *p++ = ',';
    p = put_ip(p, idm_src(m), idm_family(m));
    *p++ = ',';
    p = put_ip(p, idm_dst(m), idm_family(m));
    *p++ = ',';
    p = put_u64(p, be32(m + IDM_AT(id.idiag_if)));
    *p++ = ',';
    p = put_hex(p, le(m + IDM_AT(id.idiag_cookie), 8), "0123456789ABCDEF");
    for (size_t off = IDM_AT(idiag_expires); off < IDM_LEN; off += 4) {   /* to idiag_inode */
        *p++ = ',';
        p = put_u64(p, le(m + off, 4));
    }
    return p;
}

/* The members of a little-endian struct of size bytes, comma-separated, as a
 * Python struct format reads them ('<' first, 'x' = pad byte).  NULL for an
 * unknown code or a format that reads past size. */
static char *put_struct(char *p, const char *format, const uint8_t *raw, uint32_t size)
{
    const uint8_t *end = raw + size;
    int first = 1;
    for (const char *f = format; *f; f++) {
        int width;
        int is_signed = 0;
        switch (*f) {
        case '<': continue;
        case 'x':
            if (raw == end)
                return NULL;
            raw++;
            continue;
        case 'b': is_signed = 1; /* fall through */
        case 'B': width = 1; break;
        case 'h': is_signed = 1; /* fall through */
        case 'H': width = 2; break;
        case 'i': is_signed = 1; /* fall through */
        case 'I': width = 4; break;
        case 'q': is_signed = 1; /* fall through */
        case 'Q': width = 8; break;
        default: return NULL;
        }
        if (end - raw < width)
            return NULL;
        uint64_t v = le(raw, width);
        raw += width;
        if (!first)
            *p++ = ',';
        first = 0;
        if (is_signed && width < 8 && v >> (8 * width - 1))
            v |= ~(uint64_t)0 << (8 * width);  /* sign-extend */
        p = is_signed ? put_s64(p, (int64_t)v) : put_u64(p, v);
    }
    return p;
}

/* Whether upstream considers a present value of n bytes fully parsed. */
static int fully_parsed(const struct tcpi_csv_group *g, int64_t n)
{
    switch (g->kind) {
    case TCPI_CSV_STRUCT: return n <= g->go_size;
    case TCPI_CSV_U8: return n >= 1;
    case TCPI_CSV_MARK: return n == 4;
    default: return 1;  /* CONG (an empty one is declined) */
    }
}

/* A CONG name printable without quoting: visible ASCII, no comma, quote or
 * backslash (go_csv_field would quote some of those; Python decides). */
static int plain_name(const uint8_t *s, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (s[i] <= ' ' || s[i] >= 0x7f || s[i] == ',' || s[i] == '"' || s[i] == '\\')
            return 0;
    return 1;
}

/* The columns of one present attribute; NULL to decline the line. */
static char *put_group(char *p, const struct tcpi_csv_group *g, const struct span *s, int64_t n)
{
    uint8_t buf[MAX_STRUCT];
    uint32_t want = g->kind == TCPI_CSV_STRUCT ? g->size : g->kind == TCPI_CSV_CONG ? MAX_CONG : 4;
    if (want > MAX_STRUCT || b64_decode(s, buf, want) < 0)
        return NULL;
    switch (g->kind) {
    case TCPI_CSV_STRUCT:
        if (n < want)
            memset(buf + n, 0, want - (uint32_t)n);  /* Go reads a short value zero-padded */
        return put_struct(p, g->format, buf, want);
    case TCPI_CSV_U8:
        return put_u64(p, n >= 1 ? buf[0] : 0);
    case TCPI_CSV_MARK:
        return put_u64(p, n == 4 ? le(buf, 4) : 0);
    case TCPI_CSV_CONG:
        if (n < 1 || n > MAX_CONG || !plain_name(buf, n - 1))
            return NULL;
        memcpy(p, buf, (size_t)(n - 1));  /* upstream drops the last byte (the NUL) */
        return p + n - 1;
    default:
        return NULL;
    }
}

/* One row, ending in '\n'; returns its length or -1 to decline the line. */
static int64_t convert_line(const struct tcpi_csv_schema *schema, const int8_t *group_of,
                            const uint8_t *in, uint64_t len, char *out)
{
    struct line l;
    uint8_t idm[IDM_LEN];
    uint64_t observed = 0, not_parsed = 0;
    char *p = out;
    if (!parse_line(in, in + len, &l) || b64_size(&l.idm) < IDM_LEN || b64_decode(&l.idm, idm, IDM_LEN) < 0)
        return -1;
    if (span_is(&l.ts, schema->zero_time))
        p = put_text(p, schema->zero_time_as);
    else if (canonical_time(&l.ts, NULL))
        p = (char *)memcpy(p, l.ts.text, l.ts.len) + l.ts.len;  /* printed as written */
    else
        return -1;
    for (uint32_t t = 0; t < l.n_attrs; t++) {
        if (l.attrs[t].text == NULL)
            continue;
        int g = group_of[t];
        int ok = g >= 0 && fully_parsed(&schema->groups[g], l.size[t]);
        if (g < 0 && b64_decode(&l.attrs[t], NULL, 0) < 0)  /* grouped ones are checked as printed */
            return -1;
        if (t >= 1 && t <= 32) {  /* upstream's uint32 shift: higher types leave no trace */
            observed |= (uint64_t)1 << (t - 1);
            not_parsed |= (uint64_t)!ok << (t - 1);
        }
    }
    *p++ = ',';
    p = put_u64(p, observed);
    *p++ = ',';
    p = put_u64(p, not_parsed);
    *p++ = ',';
    p = put_idm(p, idm);
    for (uint32_t i = 0; i < schema->n_groups; i++) {
        const struct tcpi_csv_group *g = &schema->groups[i];
        *p++ = ',';
        if (g->type < l.n_attrs && l.attrs[g->type].text != NULL)
            p = put_group(p, g, &l.attrs[g->type], l.size[g->type]);
        else
            p = put_text(p, g->absent);
        if (p == NULL)
            return -1;
    }
    *p++ = '\n';
    return p - out;
}

/* Room one row can take at most. */
static uint64_t row_bound(const struct tcpi_csv_schema *schema)
{
    uint64_t zero_as = strlen(schema->zero_time_as);
    uint64_t bound = (zero_as > TIME_MAX ? zero_as : TIME_MAX) + 2 * INT_MAX_CHARS + IDM_MAX + 2;
    for (uint32_t i = 0; i < schema->n_groups; i++) {
        const struct tcpi_csv_group *g = &schema->groups[i];
        uint64_t present = g->kind == TCPI_CSV_STRUCT ? strlen(g->format) * INT_MAX_CHARS
                           : g->kind == TCPI_CSV_CONG ? MAX_CONG : INT_MAX_CHARS;
        uint64_t absent = strlen(g->absent);
        bound += 1 + (present > absent ? present : absent);
    }
    return bound;
}

void tcpi_csv_rows(const struct tcpi_csv_schema *schema, const char *in, uint64_t in_len,
                   uint64_t pos, char *out, uint64_t cap, struct tcpi_csv_progress *progress)
{
    const uint8_t *text = (const uint8_t *)in;
    uint64_t bound = row_bound(schema);
    int8_t group_of[MAX_ATTRS];
    memset(group_of, -1, sizeof group_of);
    for (uint32_t i = 0; i < schema->n_groups; i++)
        if (schema->groups[i].type < MAX_ATTRS)
            group_of[schema->groups[i].type] = (int8_t)i;
    progress->out_used = 0;
    progress->rows = 0;
    progress->stop = TCPI_CSV_DONE;
    while (pos < in_len) {
        const uint8_t *nl = memchr(text + pos, '\n', in_len - pos);
        uint64_t len = nl ? (uint64_t)(nl - (text + pos)) : in_len - pos;
        if (cap - progress->out_used < bound) {
            progress->stop = TCPI_CSV_FULL;
            break;
        }
        int64_t n = convert_line(schema, group_of, text + pos, len, out + progress->out_used);
        if (n < 0) {
            progress->stop = TCPI_CSV_DECLINED;
            break;
        }
        progress->out_used += (uint64_t)n;
        progress->rows++;
        pos += len + (nl != NULL);
    }
    progress->pos = pos;
}
