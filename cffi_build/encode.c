/*
 * encode.c - ArchivalRecord JSON lines (UPSTREAM.md 4) straight from a kernel
 * message, byte for byte as upstream writes them.  Called by the archive writer,
 * not by the poller.
 */
#define _GNU_SOURCE
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"


static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard base64 with padding, as Go's encoding/json writes []byte. */
static char *base64(char *o, const uint8_t *p, uint32_t n)
{
    uint32_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
        *o++ = B64[v >> 18];
        *o++ = B64[(v >> 12) & 63];
        *o++ = B64[(v >> 6) & 63];
        *o++ = B64[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)p[i] << 16;
        *o++ = B64[v >> 18];
        *o++ = B64[(v >> 12) & 63];
        *o++ = '=';
        *o++ = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8;
        *o++ = B64[v >> 18];
        *o++ = B64[(v >> 12) & 63];
        *o++ = B64[(v >> 6) & 63];
        *o++ = '=';
    }
    return o;
}

static char *put(char *o, const char *s, uint32_t n)
{
    memcpy(o, s, n);
    return o + n;
}

uint32_t tcpi_encode_bound(uint32_t len, uint32_t ts_len)
{
    /* fixed text + timestamp + base64 of everything + quotes/commas/nulls per slot */
    return 64 + ts_len + (len / 3 + 1) * 4 + (MAX_SLOT + 1) * 8;
}

int64_t tcpi_encode_record(const uint8_t *idm, const uint8_t *payload, uint32_t len,
                           const char *ts, uint32_t ts_len, char *out, uint32_t cap,
                           uint32_t *info_off, uint32_t *info_len)
{
    struct attrs a;
    if (len < IDM_LEN || parse_attrs(payload, len, &a) < 0)
        return -1;
    if (cap < tcpi_encode_bound(len, ts_len))
        return -2;
    char *o = out;
    o = put(o, "{\"Timestamp\":\"", 14);
    o = put(o, ts, ts_len);
    o = put(o, "\",\"RawIDM\":\"", 12);
    o = base64(o, idm, IDM_LEN);
    o = put(o, "\",\"Attributes\":[", 16);
    for (int t = 0; t < a.nslots; t++) {
        if (t)
            *o++ = ',';
        if (!a.present[t]) {
            o = put(o, "null", 4);
            continue;
        }
        *o++ = '"';
        o = base64(o, payload + a.off[t], a.len[t]);
        *o++ = '"';
    }
    o = put(o, "]}\n", 3);
    int has_info = a.nslots > INET_DIAG_INFO && a.present[INET_DIAG_INFO];
    *info_off = has_info ? a.off[INET_DIAG_INFO] : 0;
    *info_len = has_info ? a.len[INET_DIAG_INFO] : 0;
    return o - out;
}
