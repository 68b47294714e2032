/*
 * filter.c - which sockets are left out, as userspace applies the rule (the kernel
 * applies the same rule as inet_diag bytecode, compiled by tcpinfo/collector/sockfilter.py).
 */
#define _GNU_SOURCE
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <netinet/in.h>
#include <stdlib.h>

static int v4_local(const uint8_t *a)
{
    return a[0] == 127                      /* loopback */
        || (a[0] == 169 && a[1] == 254)     /* link-local */
        || (a[0] & 0xf0) == 0xe0            /* multicast */
        || (a[0] | a[1] | a[2] | a[3]) == 0;/* unspecified */
}

static const uint8_t V4MAPPED[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* Upstream's isLocal (loopback, link-local unicast, multicast, unspecified), but
 * deciding IPv4 vs IPv6 by the socket family rather than by zero bytes. */
static int addr_local(uint8_t family, const uint8_t *a)
{
    if (family == AF_INET)
        return v4_local(a);
    if (memcmp(a, V4MAPPED, 12) == 0)
        return v4_local(a + 12);
    static const uint8_t zero[16];
    if (memcmp(a, zero, 15) == 0 && (a[15] == 0 || a[15] == 1))
        return 1;                            /* :: and ::1 */
    return (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) || a[0] == 0xff;
}

static int prefix_match(const uint8_t *a, const uint8_t *prefix, uint8_t bits)
{
    uint8_t whole = bits / 8, rest = bits % 8;
    if (memcmp(a, prefix, whole) != 0)
        return 0;
    return !rest || ((a[whole] ^ prefix[whole]) & (0xff00 >> rest) & 0xff) == 0;
}

/* The kernel's host condition: an AF_INET prefix also matches the v4-mapped
 * addresses of dual-stack AF_INET6 sockets; an AF_INET6 prefix only AF_INET6. */
static int net_match(const struct net *nt, uint8_t family, const uint8_t *a)
{
    if (nt->family == AF_INET6)
        return family == AF_INET6 && prefix_match(a, nt->addr, nt->bits);
    if (family == AF_INET6) {
        if (memcmp(a, V4MAPPED, 12) != 0)
            return 0;
        a += 12;
    }
    return prefix_match(a, nt->addr, nt->bits);
}

static int in_nets(const struct net *v, uint32_t n, uint8_t family, const uint8_t *a)
{
    for (uint32_t i = 0; i < n; i++)
        if (net_match(&v[i], family, a))
            return 1;
    return 0;
}

#define BIT(map, i) ((map)[(i) >> 3] & (1u << ((i) & 7)))

/* Whether a socket is left out: upstream's exclusions, then the include lists. */
int filter_drops(const struct filter *f, const uint8_t *idm)
{
    uint8_t family = idm_family(idm);
    const uint8_t *src = idm_src(idm), *dst = idm_dst(idm);
    uint16_t sport = idm_sport(idm), dport = idm_dport(idm);
    if (BIT(f->srcport, sport))
        return 1;
    if (f->exclude_local && (addr_local(family, src) || addr_local(family, dst)))
        return 1;
    if (in_nets(f->dstip, f->n_dstip, family, dst))
        return 1;
    if (f->n_incl_net && !in_nets(f->incl_net, f->n_incl_net, family, src) &&
        !in_nets(f->incl_net, f->n_incl_net, family, dst))
        return 1;
    if (f->any_incl_port && !BIT(f->incl_port, sport) && !BIT(f->incl_port, dport))
        return 1;
    return 0;
}

void tcpi_exclude_local(struct tcpi_core *c, int on) { c->filter.exclude_local = on; }

void tcpi_exclude_srcport(struct tcpi_core *c, uint16_t port)
{
    c->filter.srcport[port >> 3] |= (uint8_t)(1u << (port & 7));
}

static int add_net(struct net **v, uint32_t *n, uint8_t family, const uint8_t *addr,
                   uint8_t bits)
{
    uint32_t size = family == AF_INET ? 4 : 16;
    if ((family != AF_INET && family != AF_INET6) || bits > size * 8 || *n >= MAX_NETS)
        return -1;
    if (!*v && !(*v = malloc(MAX_NETS * sizeof(**v))))
        return -1;
    struct net *nt = &(*v)[(*n)++];
    memset(nt, 0, sizeof(*nt));
    nt->family = family;
    nt->bits = bits;
    memcpy(nt->addr, addr, size);
    return 0;
}

int tcpi_exclude_dstip(struct tcpi_core *c, uint8_t family, const uint8_t *addr)
{
    return add_net(&c->filter.dstip, &c->filter.n_dstip, family, addr, family == AF_INET ? 32 : 128);
}

int tcpi_include_net(struct tcpi_core *c, uint8_t family, const uint8_t *addr, uint8_t bits)
{
    return add_net(&c->filter.incl_net, &c->filter.n_incl_net, family, addr, bits);
}

void tcpi_include_ports(struct tcpi_core *c, uint16_t first, uint16_t last)
{
    for (uint32_t port = first; port <= last; port++)
        c->filter.incl_port[port >> 3] |= (uint8_t)(1u << (port & 7));
    c->filter.any_incl_port = 1;
}

void tcpi_filter_clear(struct tcpi_core *c)
{
    memset(c->filter.srcport, 0, sizeof(c->filter.srcport));
    memset(c->filter.incl_port, 0, sizeof(c->filter.incl_port));
    c->filter.any_incl_port = 0;
    c->filter.n_dstip = c->filter.n_incl_net = 0;
}
