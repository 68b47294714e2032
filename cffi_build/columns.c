/*
 * columns.c - the export's hot loop: archive lines to column buffers of the
 * snapshots shape (tcpinfo/analysis/snapshots.py turns them into Arrow columns).
 *
 * It takes the lines csvtool's loop takes (lines.c: Go's line shape, strict
 * base64, a canonical timestamp or Go's zero time, a RawIDM at least as long as
 * the caller's IDM) and declines a block with any other line, for Python to
 * decode another way or report.  Per line it writes the timestamp as
 * nanoseconds, the IDM's bytes, and for each kept attribute type the value's
 * first bytes and its decoded length: what the kernel's structs are read from
 * by numpy views, all in one pass over the text.  tcpi_distinct numbers the
 * distinct values of a column of bytes, for the columns formatted as text.
 */
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <string.h>

#define NS 1000000000ll

/* Stores the row's Timestamp: ns since 1970, or for Go's zero time its null flag.
 * Returns 0 if it is neither canonical nor the zero time, or does not fit in int64 ns. */
static int timestamp(const struct tcpi_columns *cols, const struct span *ts, uint32_t row)
{
    struct instant at;
    int64_t ns;
    if (span_is(ts, cols->zero_time)) {
        cols->time_null[row] = 1;
        return 1;
    }
    if (!canonical_time(ts, &at) || __builtin_mul_overflow(at.seconds, NS, &ns) ||
        __builtin_add_overflow(ns, (int64_t)at.nanos, &ns))
        return 0;
    cols->time_ns[row] = ns;
    return 1;
}

/* One line's columns; 0 to decline it. */
static int fill_line(const struct tcpi_columns *cols, const uint8_t *in, uint64_t len, uint32_t row)
{
    struct line l;
    if (!parse_line(in, in + len, &l) || !timestamp(cols, &l.ts, row) ||
        b64_size(&l.idm) < cols->idm_len ||
        b64_decode(&l.idm, cols->idm + (uint64_t)row * cols->idm_len, cols->idm_len) < 0)
        return 0;
    int32_t *lengths = cols->lengths + (uint64_t)row * cols->n_types;
    for (uint32_t t = 0; t < cols->n_types; t++)
        lengths[t] = -1;
    for (uint32_t t = 0; t < l.n_attrs; t++) {
        if (l.attrs[t].text == NULL)
            continue;
        uint8_t *out = NULL;
        uint32_t width = 0;
        if (t < cols->n_types) {
            lengths[t] = l.size[t] > INT32_MAX ? INT32_MAX : (int32_t)l.size[t];
            if (cols->values[t]) {
                width = cols->widths[t];
                out = cols->values[t] + (uint64_t)row * width;
            }
        }
        if (b64_decode(&l.attrs[t], out, width) < 0)   /* types not kept are checked too */
            return 0;
    }
    return 1;
}

int tcpi_columns_fill(const char *in, uint64_t in_len, uint32_t first_row, uint32_t rows,
                      const struct tcpi_columns *cols)
{
    const uint8_t *text = (const uint8_t *)in;
    uint64_t pos = 0;
    for (uint32_t row = first_row; row < first_row + rows; row++) {
        const uint8_t *nl = pos < in_len ? memchr(text + pos, '\n', in_len - pos) : NULL;
        if (nl == NULL || !fill_line(cols, text + pos, (uint64_t)(nl - (text + pos)), row))
            return 0;
        pos = (uint64_t)(nl - text) + 1;
    }
    return pos == in_len;
}

/* FNV-1a over a row's bytes: rows are short (up to ~70 bytes). */
static uint32_t row_hash(const uint8_t *row, uint32_t width)
{
    uint32_t h = 2166136261u;
    for (uint32_t i = 0; i < width; i++)
        h = (h ^ row[i]) * 16777619u;
    return h;
}

uint32_t tcpi_distinct(const uint8_t *rows, uint32_t n, uint32_t width, uint32_t *index,
                       uint32_t *first, uint32_t *table, uint32_t slots)
{
    uint32_t distinct = 0, mask = slots - 1;
    memset(table, 0xff, (size_t)slots * sizeof *table);   /* UINT32_MAX: an empty slot */
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *row = rows + (uint64_t)i * width;
        if (i && memcmp(row, row - width, width) == 0) {   /* the usual case: as the row before */
            index[i] = index[i - 1];
            continue;
        }
        uint32_t slot = row_hash(row, width) & mask;
        while (table[slot] != UINT32_MAX &&
               memcmp(rows + (uint64_t)first[table[slot]] * width, row, width) != 0)
            slot = (slot + 1) & mask;
        if (table[slot] == UINT32_MAX) {
            table[slot] = distinct;
            first[distinct++] = i;
        }
        index[i] = table[slot];
    }
    return distinct;
}
