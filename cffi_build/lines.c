/*
 * lines.c - reading archive lines in the shape Go's encoder (and ours) writes:
 *   {"Timestamp":"<RFC 3339>","RawIDM":"<base64>","Attributes":[null,"<base64>",...]}
 * with "Attributes" also allowed to be absent or null: the split into strings,
 * strict base64 and Go's canonical time.  csv.c (csvtool's rows) and columns.c
 * (the export's columns) both read lines with these, and both decline what they
 * do not recognise, for Python to convert or report.
 */
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <string.h>

/* Standard base64 alphabet; -1 for everything else, '=' included. */
static const int8_t B64[256] = {
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 62, -1, -1, -1, 63,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, -1, -1, -1, -1, -1, -1,
    -1,  0,  1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12, 13, 14,
    15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, -1, -1, -1, -1, -1,
    -1, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
    41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
};

/* ---- reading the line --------------------------------------------------- */

/* Consumes the literal lit at *p if it is there. */
static int eat(const uint8_t **p, const uint8_t *end, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(end - *p) < n || memcmp(*p, lit, n) != 0)
        return 0;
    *p += n;
    return 1;
}

/* Consumes a string's contents and its closing quote.  An escape ends up in the
 * contents, where the strict checks of time and base64 decline it. */
static int string_to_quote(const uint8_t **p, const uint8_t *end, struct span *s)
{
    const uint8_t *q = memchr(*p, '"', (size_t)(end - *p));
    if (q == NULL || q - *p > UINT32_MAX)
        return 0;
    s->text = *p;
    s->len = (uint32_t)(q - *p);
    *p = q + 1;
    return 1;
}

int span_is(const struct span *s, const char *text)
{
    size_t n = strlen(text);
    return s->len == n && memcmp(s->text, text, n) == 0;
}

/* Length that base64 text decodes to: a multiple of 4 characters with at most
 * two '=' at the end (what binascii's strict mode surely accepts); -1 if not. */
int64_t b64_size(const struct span *s)
{
    uint32_t pad = 0;
    if (s->len % 4)
        return -1;
    if (s->len && s->text[s->len - 1] == '=')
        pad = s->text[s->len - 2] == '=' ? 2 : 1;
    return (int64_t)s->len / 4 * 3 - pad;
}

/* Stores the k (1-3) bytes of v from out[n], as far as cap allows. */
static inline void put_quad(uint8_t *out, uint32_t n, uint32_t cap, uint32_t v, int k)
{
    if (k == 3 && n + 3 <= cap) {
        out[n] = (uint8_t)(v >> 16);
        out[n + 1] = (uint8_t)(v >> 8);
        out[n + 2] = (uint8_t)v;
        return;
    }
    for (int j = 0; j < k && n + j < cap; j++)
        out[n + j] = (uint8_t)(v >> (16 - 8 * j));
}

/* Decodes base64 text of that shape, storing the first cap bytes in out (the
 * rest is only checked).  Returns 0, or -1 for a character outside the alphabet.
 * Only the last quad may hold padding, so the others take the short loop. */
int b64_decode(const struct span *s, uint8_t *out, uint32_t cap)
{
    const uint8_t *q = s->text;
    uint32_t n = 0, i = 0, body = s->len ? s->len - 4 : 0;
    if (s->len % 4)
        return -1;
    for (; i < body; i += 4, n += 3) {
        int a = B64[q[i]], b = B64[q[i + 1]], c = B64[q[i + 2]], d = B64[q[i + 3]];
        if ((a | b | c | d) < 0)
            return -1;
        put_quad(out, n, cap, (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)c << 6 | (uint32_t)d, 3);
    }
    if (!s->len)
        return 0;
    q += body;
    int pad = (q[3] == '=') + (q[2] == '=');
    int a = B64[q[0]], b = B64[q[1]];
    int c = pad == 2 ? 0 : B64[q[2]];
    int d = pad >= 1 ? 0 : B64[q[3]];
    if ((a | b | c | d) < 0)
        return -1;
    put_quad(out, n, cap, (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)c << 6 | (uint32_t)d, 3 - pad);
    return 0;
}

static int digits(const uint8_t *s, int n, int *value)
{
    *value = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        *value = *value * 10 + (s[i] - '0');
    }
    return 1;
}

static int days_in_month(int year, int month)
{
    static const uint8_t days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    return days[month - 1] + (month == 2 && leap);
}

/* Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    return era * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719468;
}

/* Whether Go prints this Timestamp back unchanged: a real date and time after
 * Go's zero time, a fraction of 1-9 digits not ending in 0, and Z or a
 * non-zero offset of at most 23:59.  (Python's _CANONICAL_SUFFIX rule.)  If so
 * and `at` is given, *at is the instant: UTC seconds since 1970 and nanoseconds. */
int canonical_time(const struct span *ts, struct instant *at)
{
    const uint8_t *s = ts->text;
    uint32_t n = ts->len, i = 19;
    int y, mo, d, h, mi, sec, oh = 0, om = 0, frac = 0, sign = 0;
    if (n < 20 || s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':')
        return 0;
    if (!digits(s, 4, &y) || !digits(s + 5, 2, &mo) || !digits(s + 8, 2, &d) ||
        !digits(s + 11, 2, &h) || !digits(s + 14, 2, &mi) || !digits(s + 17, 2, &sec))
        return 0;
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 ||
        sec > 59 || (y == 1 && mo == 1 && d == 1 && h == 0 && mi == 0 && sec == 0))
        return 0;
    if (s[i] == '.') {
        uint32_t start = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            frac = frac * 10 + (s[i++] - '0');
        if (i == start || i - start > 9 || s[i - 1] == '0')
            return 0;
        for (uint32_t k = i - start; k < 9; k++)
            frac *= 10;
    }
    if (i + 1 == n && s[i] == 'Z') {
        /* UTC */
    } else if (i + 6 == n && (s[i] == '+' || s[i] == '-') && s[i + 3] == ':' &&
               digits(s + i + 1, 2, &oh) && digits(s + i + 4, 2, &om) && oh <= 23 && om <= 59 &&
               (oh || om)) {
        sign = s[i] == '+' ? 1 : -1;
    } else {
        return 0;
    }
    if (at) {
        at->seconds = ((days_from_civil(y, mo, d) * 24 + h) * 60 + mi) * 60 + sec -
                      sign * (oh * 3600 + om * 60);
        at->nanos = frac;
    }
    return 1;
}

/* One element of the Attributes array: null, or a string of well-formed base64 length. */
static int parse_attribute(const uint8_t **p, const uint8_t *end, struct span *a, int64_t *size)
{
    if (eat(p, end, "null")) {
        a->text = NULL;
        return 1;
    }
    return eat(p, end, "\"") && string_to_quote(p, end, a) && (*size = b64_size(a)) >= 0;
}

/* Splits the canonical line shape into its strings; 0 if it is not that shape. */
int parse_line(const uint8_t *p, const uint8_t *end, struct line *l)
{
    l->n_attrs = 0;
    if (!eat(&p, end, "{\"Timestamp\":\"") || !string_to_quote(&p, end, &l->ts) ||
        !eat(&p, end, ",\"RawIDM\":\"") || !string_to_quote(&p, end, &l->idm))
        return 0;
    if (eat(&p, end, ",\"Attributes\":[")) {
        if (!eat(&p, end, "]")) {
            do {
                if (l->n_attrs == MAX_ATTRS ||
                    !parse_attribute(&p, end, &l->attrs[l->n_attrs], &l->size[l->n_attrs]))
                    return 0;
                l->n_attrs++;
            } while (eat(&p, end, ","));
            if (!eat(&p, end, "]"))
                return 0;
        }
    } else {
        eat(&p, end, ",\"Attributes\":null");
    }
    return eat(&p, end, "}") && p == end;
}
