/*
 * tcpinfo_core.c - netlink inet_diag poller with an in-C snapshot table.
 *
 * One poll = one dump of AF_INET6 and one of AF_INET over a netlink socket that
 * stays open.  For every socket the loop reads the cookie from the 72-byte
 * inet_diag_msg, applies the exclusions, compares the message with the previous
 * poll's copy by upstream's Compare rules (UPSTREAM.md 3.3) and appends it to the
 * result only when it is new or changed.  At the end, connections of a family
 * whose dump completed but which were not seen are reported as vanished.  Python
 * therefore does no work per idle socket.
 *
 * Optionally a second netlink socket listens to the kernel's TCP destroy groups:
 * each socket's final tcp_info then closes its connection (TCPI_FINAL), and a
 * connection that lived between two polls still gets its one record (TCPI_SHORT).
 */
#define _GNU_SOURCE
#include "tcpinfo_core.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <netinet/in.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <linux/inet_diag.h>

#define MIN_RECV 32768u
#define IDM_LEN 72            /* sizeof(struct inet_diag_msg) */
#define MAX_SLOT 38           /* upstream keeps attribute types 0..38 */
#define INFO_SLOT 2           /* INET_DIAG_INFO */
#define MAX_NETS 1024        /* excluded destinations, included networks */
#define SKNLGRP_INET_TCP_DESTROY 1
#define SKNLGRP_INET6_TCP_DESTROY 3
#define CLOSED_KEEP_NS (60 * 1000000000LL)  /* how long a late destroy is recognised */
#define QUEUE_MAX (64u << 20)  /* destroy notifications waiting for the poll thread */
#define TIMER_TIMEWAIT 3      /* idiag_timer of a time-wait socket, and of nothing else */
#define TUPLE_LEN 37          /* family, then idiag_sport, dport, src and dst */
#define MAX_THREADS 16
#ifndef RING                 /* (a sanitizer build may shrink it to exercise full rings) */
#define RING 16               /* receive buffers a helper may fill ahead of the poll thread */
#endif

/* ---- snapshot table: open addressing keyed by cookie -------------------- */

/* What became of a tracked connection. */
enum fate {
    LIVE = 0,      /* seen by polls; data holds the last payload */
    FINISHED = 1,  /* its destroy notification was recorded: a time-wait remnant
                      with the same cookie is ignored until the dumps lose it */
    CLOSED = 2,    /* reported vanished by a poll; kept (without data) for
                      CLOSED_KEEP_NS so that a late notification is not taken for
                      a new connection */
    HELD = 3,      /* a time-wait socket under a cookie never seen alive: probably the
                      remnant of a short flow whose notification is on its way; data
                      holds it, unreported, until that notification claims it (then
                      REMNANT) or the grace ends (then it is new, as upstream has it) */
    REMNANT = 4    /* the time-wait remnant of a short flow, under a cookie of its own:
                      ignored until the dumps lose it */
};

struct entry {
    uint64_t cookie;
    uint8_t *data;     /* last payload seen (LIVE only) */
    uint32_t len, cap;
    uint32_t epoch;    /* poll number when last seen */
    uint8_t family;
    uint8_t used;
    uint8_t fate;      /* enum fate */
    int64_t since_ns;  /* LIVE: first poll that missed it (0: seen); CLOSED: closing time;
                          HELD: when a dump first showed it */
};

/* An address prefix, matched as inet_diag bytecode's host condition does. */
struct net {
    uint8_t family;
    uint8_t bits;
    uint8_t addr[16];
};

struct table {
    struct entry *slots;
    uint32_t cap;      /* power of two */
    uint32_t count;
};

struct arena {
    uint8_t *data;
    uint32_t len, cap;
};

struct recvec {
    struct tcpi_record *v;
    uint32_t n, cap;
};

struct tcpi_core;

/* Destroy notifications, read by a thread of their own as the kernel sends them.
 * The kernel drops what does not fit the listener's receive buffer (capped by
 * net.core.rmem_max without CAP_NET_ADMIN: 416 KB on a default host, a few
 * hundred notifications), and the poll thread may be busy for longer than that
 * lasts under heavy churn; the reader only copies each one into this queue, which
 * the poll thread empties whenever it handles notifications.  Each queued item is
 * a struct queued header followed by the bytes of one recv. */
struct queued {
    uint32_t len;
    int64_t realtime_ns;      /* when the reader received it */
};

struct dqueue {
    pthread_t thread;
    int running;
    int wake_fd;              /* eventfd, readable while items wait (polls wait on it) */
    int stop_fd[2];           /* a pipe that ends the reader */
    pthread_mutex_t mu;       /* guards the fields below */
    uint8_t *buf;             /* queued items */
    uint32_t len, cap;
    uint32_t overruns;        /* ENOBUFS, and items dropped for lack of room */
    uint32_t bad;             /* recvs not from the kernel, or truncated */
    int32_t errno_value;      /* last unexpected receive error */
};

/* What one thread asks of one family: a bytecode program (INET_DIAG_REQ_BYTECODE,
 * allocated aligned; NULL: none), or nothing at all (skip: another thread dumps the
 * whole family, and not walking it saves this thread a pass over the hash table). */
struct program {
    uint8_t *code;
    uint32_t len;
    int skip;
};

/* One netlink socket and what it asks for.  A poll dumps with one per thread: the
 * poll thread's (dumpers[0]) and those of its helpers, each with programs that
 * select its share of the sockets. */
struct dumper {
    int fd;
    uint32_t port_id;
    uint32_t seq;
    uint8_t *buf;             /* receive buffer */
    uint32_t buf_size;
    struct program prog[2];   /* [0] for AF_INET6, [1] for AF_INET, as in FAMILIES */
    int64_t busy_ns;          /* time spent dumping since tcpi_thread_busy last read it */
    /* Helpers only.  Each recv is handed to the poll thread, which alone owns the
     * snapshot table, through a ring of RING buffers: the helper fills slot
     * head % RING, the poll thread diffs slots up to head and frees them up to
     * tail.  head and tail only grow; each has one writer and is shared through
     * atomics, so a helper and the poll thread work on the same poll at once. */
    uint8_t *ring[RING];
    uint32_t ring_len[RING], ring_seq[RING];
    uint8_t ring_family[RING];    /* family slot, as in FAMILIES */
    uint32_t head, tail;
    uint32_t done_job;            /* the last job whose every chunk is in the ring */
    int sleeping;                 /* the helper waits for a free slot */
    struct tcpi_family_stats st[2];      /* the helper's: recvs, errors, times */
    struct tcpi_family_stats diffed[2];  /* the poll thread's count of the helper's sockets */
    int ok[2];                    /* the helper's dumps completed (helper writes) */
    int diff_ok[2];               /* their chunks were all diffed (poll thread writes) */
    pthread_t thread;
    uint32_t job_seen;        /* the poll job before the thread started */
    struct tcpi_core *core;
};

struct tcpi_core {
    struct dumper *dumpers;
    uint32_t n_dumpers;
    pthread_mutex_t mu;       /* guards job and quit; sleeping on the conditions */
    pthread_cond_t go;        /* a new job, or quit (helpers wait) */
    pthread_cond_t ready;     /* a chunk handed over, or a job finished (poll thread waits) */
    pthread_cond_t space;     /* ring slots freed (helpers wait) */
    uint32_t job;
    int quit;
    int source;               /* whose message the diff is at: 2 * thread + family slot */
    int sleeping;             /* the poll thread waits for the helpers */
    uint32_t recv_size;
    uint8_t ext;
    uint32_t states;
    uint32_t epoch;
    int exclude_local;
    uint8_t srcport[65536 / 8];
    struct net *dstip, *incl_net;
    uint32_t n_dstip, n_incl_net;
    uint8_t incl_port[65536 / 8];
    int any_incl_port;
    int netns;              /* the network namespace the core was made in, -1 unknown */
    int dfd;                /* destroy listener, -1 if none */
    struct dqueue dq;       /* what its reader thread received */
    uint8_t *taken;         /* the queue's items being handled (swapped with dq.buf) */
    uint32_t taken_cap;
    int64_t grace_ns;
    struct table tbl;
    struct table shortflows;  /* 4-tuples of recent short flows (see remember_short) */
    struct arena arena;
    struct recvec changed, gone, destroyed;
    struct tcpi_poll_result result;
};

static int64_t now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint32_t slot_of(const struct table *t, uint64_t cookie)
{
    /* Fibonacci hashing spreads the kernel's sequential cookies. */
    return (uint32_t)((cookie * 0x9E3779B97F4A7C15ull) >> 32) & (t->cap - 1);
}

static int table_grow(struct table *t)
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
        uint32_t j = slot_of(t, old[i].cookie);
        while (ns[j].used)
            j = (j + 1) & (ncap - 1);
        ns[j] = old[i];
    }
    free(old);
    return 0;
}

/* Finds the cookie's entry, or the empty slot where it belongs (used == 0). */
static struct entry *table_find(struct table *t, uint64_t cookie)
{
    uint32_t j = slot_of(t, cookie);
    while (t->slots[j].used && t->slots[j].cookie != cookie)
        j = (j + 1) & (t->cap - 1);
    return &t->slots[j];
}

/* Linear-probing delete with backward shift, so no tombstones accumulate. */
static void table_delete_at(struct table *t, uint32_t i)
{
    uint32_t mask = t->cap - 1, j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!t->slots[j].used)
            break;
        uint32_t k = slot_of(t, t->slots[j].cookie);
        int stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
        if (stays)
            continue;
        t->slots[i] = t->slots[j];
        i = j;
    }
    memset(&t->slots[i], 0, sizeof(t->slots[i]));
    t->count--;
}

/* ---- result buffers ------------------------------------------------------ */

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
    memcpy(a->data + a->len, p, n);
    *off = a->len;
    a->len += n;
    return 0;
}

static int report(struct tcpi_core *c, struct recvec *v, const uint8_t *p, uint32_t n,
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

/* ---- attributes and Compare ---------------------------------------------- */

struct attrs {
    uint16_t off[MAX_SLOT + 1];
    uint16_t len[MAX_SLOT + 1];
    uint8_t present[MAX_SLOT + 1];
    int nslots;        /* upstream's len(Attributes): min(max type, 38) + 1 */
};

/* Splits the bytes after the inet_diag_msg into slots as upstream does: the last
 * duplicate wins, types above 38 are dropped.  Returns -1 on a malformed rtattr
 * (upstream's EINVAL: the whole record is rejected). */
static int parse_attrs(const uint8_t *p, uint32_t n, struct attrs *a)
{
    uint32_t pos = IDM_LEN, maxtype = 0;
    memset(a->present, 0, sizeof(a->present));
    while (pos < n && n - pos >= 4) {
        uint16_t rlen, rtype;
        memcpy(&rlen, p + pos, 2);
        memcpy(&rtype, p + pos + 2, 2);
        if (rlen < 4 || rlen > n - pos)
            return -1;
        if (rtype > maxtype)
            maxtype = rtype;
        if (rtype <= MAX_SLOT) {
            a->present[rtype] = 1;
            a->off[rtype] = (uint16_t)(pos + 4);
            a->len[rtype] = (uint16_t)(rlen - 4);
        }
        pos += (rlen + 3u) & ~3u;
    }
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
    if (cur[1] != prev[1])
        return TCPI_STATE_CHANGE;
    int c_info = ca->nslots > INFO_SLOT && ca->present[INFO_SLOT];
    int p_info = pa->nslots > INFO_SLOT && pa->present[INFO_SLOT];
    if (c_info != p_info)
        return TCPI_NO_TCPINFO;
    if (c_info) {
        const uint8_t *ci = cur + ca->off[INFO_SLOT], *pi = prev + pa->off[INFO_SLOT];
        uint32_t cl = ca->len[INFO_SLOT], pl = pa->len[INFO_SLOT];
        if (range_differs(ci, cl, pi, pl, 60, 168) || range_differs(ci, cl, pi, pl, 0, 44))
            return TCPI_STATE_OR_COUNTER;
    }
    if (pa->nslots < ca->nslots)
        return TCPI_NEW_ATTRIBUTE;
    if (pa->nslots > ca->nslots)
        return TCPI_LOST_ATTRIBUTE;
    for (int t = 0; t < ca->nslots; t++) {
        if (t == INFO_SLOT)
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
        if (rtype == INFO_SLOT)
            counters |= range_differs(cv, vlen, pv, vlen, 60, 168) ||
                        range_differs(cv, vlen, pv, vlen, 0, 44);
        else if (!other)
            other = memcmp(cv, pv, vlen) != 0;
        pos += (rlen + 3u) & ~3u;
    }
    *kind = cur[1] != prev[1] ? TCPI_STATE_CHANGE
          : counters ? TCPI_STATE_OR_COUNTER
          : other ? TCPI_OTHER : TCPI_NO_CHANGE;
    return 1;
}

/* Upstream's Compare of a message with the previous one of the same socket (the
 * stored copy is known to be well formed).  Returns -1 if cur is malformed. */
static int diff(const uint8_t *cur, uint32_t n, const uint8_t *prev, uint32_t plen, uint8_t *kind)
{
    struct attrs ca, pa;
    if (compare_same_layout(cur, n, prev, plen, kind))
        return 0;
    if (parse_attrs(cur, n, &ca) < 0 || parse_attrs(prev, plen, &pa) < 0)
        return -1;
    *kind = compare(cur, n, &ca, prev, plen, &pa);
    return 0;
}

/* ---- exclusions ---------------------------------------------------------- */

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
static int filtered_out(const struct tcpi_core *c, const uint8_t *idm)
{
    uint8_t family = idm[0];
    const uint8_t *src = idm + 8, *dst = idm + 24;
    uint16_t sport = (uint16_t)(idm[4] << 8 | idm[5]), dport = (uint16_t)(idm[6] << 8 | idm[7]);
    if (BIT(c->srcport, sport))
        return 1;
    if (c->exclude_local && (addr_local(family, src) || addr_local(family, dst)))
        return 1;
    if (in_nets(c->dstip, c->n_dstip, family, dst))
        return 1;
    if (c->n_incl_net && !in_nets(c->incl_net, c->n_incl_net, family, src) &&
        !in_nets(c->incl_net, c->n_incl_net, family, dst))
        return 1;
    if (c->any_incl_port && !BIT(c->incl_port, sport) && !BIT(c->incl_port, dport))
        return 1;
    return 0;
}

/* ---- netlink ------------------------------------------------------------- */

#define THREAD_NETNS "/proc/thread-self/ns/net"

static int in_netns(int ns_fd)
{
    struct stat a, b;
    return fstat(ns_fd, &a) == 0 && stat(THREAD_NETNS, &b) == 0 && a.st_ino == b.st_ino &&
           a.st_dev == b.st_dev;
}

/* A NETLINK_SOCK_DIAG socket in the namespace the core was made in, even when the
 * calling thread has moved since (tests and tools move threads between
 * namespaces; a socket belongs to the namespace it was created in, forever). */
static int netns_socket(struct tcpi_core *c, int flags)
{
    int home = -1;
    if (c->netns >= 0 && !in_netns(c->netns)) {
        home = open(THREAD_NETNS, O_RDONLY | O_CLOEXEC);
        if (home < 0 || setns(c->netns, CLONE_NEWNET) < 0) {
            int e = errno;
            if (home >= 0)
                close(home);
            errno = e;
            return -1;
        }
    }
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | flags, NETLINK_SOCK_DIAG);
    if (home >= 0) {
        int e = errno;
        setns(home, CLONE_NEWNET);
        close(home);
        errno = e;
    }
    return fd;
}

static int open_socket(struct dumper *d)
{
    int fd = netns_socket(d->core, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
    socklen_t sl = sizeof(sa);
    /* A dump that never finishes must not hang the collector forever. */
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    d->fd = fd;
    d->port_id = sa.nl_pid;
    return 0;
}

/* After a failed dump the socket may still hold the rest of it; start afresh
 * rather than parse stale replies. */
static void reset_socket(struct dumper *d)
{
    close(d->fd);
    d->fd = -1;
    open_socket(d);
}

static int slot_of_family(uint8_t family)
{
    return family == AF_INET6 ? 0 : 1;
}

static int send_request(struct dumper *d, uint8_t ext, uint8_t family, uint32_t states)
{
    const struct program *prog = &d->prog[slot_of_family(family)];
    struct {
        struct nlmsghdr nh;
        struct inet_diag_req_v2 req;
        struct nlattr bc;
    } msg;
    memset(&msg, 0, sizeof(msg));
    size_t head = offsetof(__typeof__(msg), bc);
    msg.nh.nlmsg_len = (uint32_t)head;
    msg.nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    msg.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    msg.nh.nlmsg_seq = ++d->seq;
    msg.req.sdiag_family = family;
    msg.req.sdiag_protocol = IPPROTO_TCP;
    msg.req.idiag_ext = ext;
    msg.req.idiag_states = states;
    struct iovec iov[3] = {{&msg, head}, {&msg.bc, 0}, {prog->code, 0}};
    if (prog->len) {
        msg.bc.nla_type = INET_DIAG_REQ_BYTECODE;
        msg.bc.nla_len = (uint16_t)(NLA_HDRLEN + prog->len);
        msg.nh.nlmsg_len += NLA_HDRLEN + NLA_ALIGN(prog->len);
        iov[1].iov_len = NLA_HDRLEN;
        iov[2].iov_len = NLA_ALIGN(prog->len);  /* buffer is allocated aligned */
    }
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    struct msghdr mh = {.msg_name = &kernel, .msg_namelen = sizeof(kernel), .msg_iov = iov,
                        .msg_iovlen = 3};
    if (d->fd < 0 && open_socket(d) < 0)
        return -1;
    ssize_t r;
    do
        r = sendmsg(d->fd, &mh, 0);
    while (r < 0 && errno == EINTR);
    return r == (ssize_t)msg.nh.nlmsg_len ? 0 : -1;
}

static ssize_t recv_some(struct dumper *d, uint8_t *buf, int *truncated)
{
    struct iovec iov = {buf, d->buf_size};
    struct sockaddr_nl sa;
    struct msghdr mh = {.msg_name = &sa, .msg_namelen = sizeof(sa), .msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n;
    do
        n = recvmsg(d->fd, &mh, 0);
    while (n < 0 && errno == EINTR);
    *truncated = n >= 0 && (mh.msg_flags & MSG_TRUNC);
    return n;
}

static uint64_t cookie_of(const uint8_t *idm)
{
    uint32_t lo, hi;
    memcpy(&lo, idm + 44, 4);
    memcpy(&hi, idm + 48, 4);
    return (uint64_t)hi << 32 | lo;
}

/* The cookie's entry, created empty (used, LIVE, no data) if it is new. */
static struct entry *table_get(struct table *t, uint64_t cookie, int *created)
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
static int store(struct entry *e, const uint8_t *p, uint32_t n)
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

static void drop_data(struct entry *e)
{
    free(e->data);
    e->data = NULL;
    e->len = e->cap = 0;
}

/* ---- time-wait remnants of short flows ------------------------------------ */

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
    h = (h ^ idm[0]) * 0x100000001b3ull;            /* family */
    for (int i = 4; i < 40; i++)                     /* sport, dport, src, dst */
        h = (h ^ idm[i]) * 0x100000001b3ull;
    return h;
}

static int remember_short(struct tcpi_core *c, const uint8_t *idm)
{
    int created;
    struct entry *e = table_get(&c->shortflows, tuple_key(idm), &created);
    if (!e)
        return -1;
    e->epoch = c->epoch;
    e->since_ns = now_ns(CLOCK_MONOTONIC);
    return 0;
}

static int recently_short(struct tcpi_core *c, const uint8_t *idm)
{
    return table_find(&c->shortflows, tuple_key(idm))->used;
}

/* A remnant's short flow is known: ignore the remnant until the dumps lose it. */
static void settle_remnant(struct tcpi_core *c, struct entry *e)
{
    drop_data(e);
    e->fate = REMNANT;
    c->result.destroy.remnants++;
}

/* Forgets the short flows whose remnants have had time to appear: the first dump
 * after the notification shows one, so two polls and twice the grace are plenty. */
static void forget_shortflows(struct tcpi_core *c, int64_t now)
{
    struct table *t = &c->shortflows;
    for (uint32_t i = 0; t->count && i < t->cap;) {
        const struct entry *e = &t->slots[i];
        if (e->used && c->epoch - e->epoch >= 2 && now - e->since_ns >= 2 * c->grace_ns)
            table_delete_at(t, i);   /* slot i now holds a shifted entry: re-examine */
        else
            i++;
    }
}

/* A time-wait socket first seen under a cookie of its own, while destroy
 * notifications are heard.  A recent short flow's remnant is ignored for its whole
 * life; any other is held back, unreported, for the grace (see sweep). */
static int hold_timewait(struct tcpi_core *c, const uint8_t *p, uint32_t n, uint64_t cookie)
{
    int created;
    struct entry *e = table_get(&c->tbl, cookie, &created);
    if (!e)
        return -1;
    e->family = p[0];
    e->epoch = c->epoch;
    if (recently_short(c, p)) {
        settle_remnant(c, e);
        return 0;
    }
    if (store(e, p, n) < 0) {
        table_delete_at(&c->tbl, (uint32_t)(e - c->tbl.slots));
        return -1;
    }
    e->fate = HELD;
    e->since_ns = now_ns(CLOCK_REALTIME);
    return 0;
}

/* ---- the diff ------------------------------------------------------------- */

/* Handles one inet_diag message of the dump. */
static int on_socket(struct tcpi_core *c, const uint8_t *p, uint32_t n,
                     struct tcpi_family_stats *st)
{
    st->messages++;
    if (n < IDM_LEN) {
        st->bad++;
        return 0;
    }
    if (filtered_out(c, p)) {
        st->excluded++;
        return 0;
    }
    struct attrs ca;
    uint64_t cookie = cookie_of(p);
    struct entry *e = table_find(&c->tbl, cookie);
    uint8_t kind;
    if (e->used && (e->fate == FINISHED || e->fate == REMNANT)) {
        e->epoch = c->epoch;   /* the time-wait remnant of a connection already closed */
        return 0;
    }
    if (e->used && e->fate == HELD) {
        e->epoch = c->epoch;
        if (recently_short(c, p))
            settle_remnant(c, e);
        return 0;
    }
    if (e->used && e->fate == LIVE) {
        if (diff(p, n, e->data, e->len, &kind) < 0) {
            st->bad++;
            e->epoch = c->epoch;  /* a malformed message still proves the socket exists */
            return 0;
        }
    } else {
        /* New, or a CLOSED cookie connected again (tcp_disconnect keeps the socket). */
        int created;
        if (parse_attrs(p, n, &ca) < 0) {
            st->bad++;
            return 0;
        }
        if (!e->used && c->dfd >= 0 && p[2] == TIMER_TIMEWAIT)
            return hold_timewait(c, p, n, cookie);
        if (!(e = table_get(&c->tbl, cookie, &created)))
            return -1;
        kind = TCPI_PREVIOUS_WAS_NIL;
        e->fate = LIVE;
    }
    e->epoch = c->epoch;
    e->since_ns = 0;
    e->family = p[0];
    /* An unchanged message equals the stored copy in every byte Compare reads, so
     * the copy is only renewed on a change: comparing with it is comparing with the
     * previous poll's message, as upstream does.  What it misses in between are
     * timers and counters that move only with compared ones (bytes_sent moves with
     * segs_out), so the vanished report still carries the last counters. */
    if (kind == TCPI_NO_CHANGE)
        return 0;
    if (store(e, p, n) < 0)
        return -1;
    /* The time is its dump's end, not known yet: the source stands in (see stamp). */
    return report(c, &c->changed, p, n, cookie, p[0], kind, -(int64_t)c->source - 1);
}

/* What a dump does with each socket's message. */
enum walk_mode {
    PROCESS,   /* filter, diff and report it (the poll thread only) */
    COUNT,     /* count it: the benchmark's bare loop */
    STREAM     /* nothing yet: a helper hands the checked chunk to the poll thread */
};

/* Before a recv's messages are diffed, asks the memory system for what they will
 * touch: first every cookie's table slot, then each known socket's stored copy.
 * The misses then overlap instead of stalling the diff one socket at a time. */
static void prefetch(struct tcpi_core *c, const uint8_t *b, uint32_t n)
{
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t pos = 0; pos + sizeof(struct nlmsghdr) + IDM_LEN <= n;) {
            const struct nlmsghdr *h = (const struct nlmsghdr *)(b + pos);
            if (h->nlmsg_len < sizeof(*h) || h->nlmsg_len > n - pos)
                break;
            if (h->nlmsg_type == SOCK_DIAG_BY_FAMILY && h->nlmsg_len >= sizeof(*h) + IDM_LEN) {
                uint64_t cookie = cookie_of((const uint8_t *)(h + 1));
                if (pass == 0) {
                    __builtin_prefetch(&c->tbl.slots[slot_of(&c->tbl, cookie)]);
                } else {
                    const struct entry *e = table_find(&c->tbl, cookie);
                    for (uint32_t off = 0; e->used && off < e->len; off += 64)
                        __builtin_prefetch(e->data + off);
                }
            }
            pos += NLMSG_ALIGN(h->nlmsg_len);
        }
    }
}

/* Walks the netlink messages of one recv.  Returns 1 when the dump is done,
 * 0 to keep reading, -1 on failure (st->status set). */
static int walk(struct tcpi_core *c, uint32_t seq, uint32_t port_id, const uint8_t *b, uint32_t n,
                struct tcpi_family_stats *st, enum walk_mode mode, int64_t *count)
{
    uint32_t pos = 0;
    if (mode == PROCESS)
        prefetch(c, b, n);
    while (pos + sizeof(struct nlmsghdr) <= n) {
        const struct nlmsghdr *h = (const struct nlmsghdr *)(b + pos);
        if (h->nlmsg_len < sizeof(*h) || h->nlmsg_len > n - pos) {
            st->status = TCPI_E_TRUNCATED;
            return -1;
        }
        if (h->nlmsg_seq != seq) {
            st->status = TCPI_E_SEQ;
            return -1;
        }
        if (h->nlmsg_pid != port_id) {
            st->status = TCPI_E_PID;
            return -1;
        }
        if (h->nlmsg_flags & NLM_F_DUMP_INTR)
            st->interrupted = 1;
        const uint8_t *payload = b + pos + sizeof(*h);
        uint32_t plen = h->nlmsg_len - sizeof(*h);
        if (h->nlmsg_type == NLMSG_DONE)
            return 1;
        if (h->nlmsg_type == NLMSG_ERROR) {
            int32_t code = 0;
            if (plen < 4) {
                st->status = TCPI_E_TRUNCATED;
                return -1;
            }
            memcpy(&code, payload, 4);
            if (code == 0)
                return 1;
            st->status = TCPI_E_NLMSG_ERROR;
            st->errno_value = -code;
            return -1;
        }
        if (mode == STREAM) {
            /* counted when the poll thread diffs the chunk */
        } else if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY) {
            st->bad++;
        } else if (mode == COUNT) {
            (*count)++;
        } else if (on_socket(c, payload, plen, st) < 0) {
            st->status = TCPI_E_NOMEM;
            return -1;
        }
        if (!(h->nlmsg_flags & NLM_F_MULTI))
            return 1;
        pos += NLMSG_ALIGN(h->nlmsg_len);
    }
    return 0;
}

/* ---- dump threads ------------------------------------------------------------ */

static const uint8_t FAMILIES[2] = {AF_INET6, AF_INET};

/* Wakes a thread sleeping on cond, if its flag says it may be.  The sleeper sets
 * the flag before its last look at the counters and the waker publishes before
 * reading the flag (both sequentially consistent), so one of them sees the
 * other: the common case costs no lock, and no wake-up is lost. */
static void wake(struct tcpi_core *c, int *sleeping, pthread_cond_t *cond)
{
    if (!__atomic_load_n(sleeping, __ATOMIC_SEQ_CST))
        return;
    pthread_mutex_lock(&c->mu);
    pthread_cond_broadcast(cond);
    pthread_mutex_unlock(&c->mu);
}

static int ring_full(const struct dumper *d)
{
    return d->head - __atomic_load_n(&d->tail, __ATOMIC_SEQ_CST) == RING;
}

/* A helper's next empty ring buffer; waits (not counted as busy) while all are full. */
static uint8_t *free_slot(struct tcpi_core *c, struct dumper *d, int64_t *waited)
{
    if (ring_full(d)) {
        int64_t t0 = now_ns(CLOCK_MONOTONIC);
        pthread_mutex_lock(&c->mu);
        __atomic_store_n(&d->sleeping, 1, __ATOMIC_SEQ_CST);
        while (ring_full(d))
            pthread_cond_wait(&c->space, &c->mu);
        __atomic_store_n(&d->sleeping, 0, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&c->mu);
        *waited += now_ns(CLOCK_MONOTONIC) - t0;
    }
    return d->ring[d->head % RING];
}

static void hand_over(struct tcpi_core *c, struct dumper *d, int f, uint32_t n)
{
    uint32_t k = d->head % RING;
    d->ring_len[k] = n;
    d->ring_seq[k] = d->seq;
    d->ring_family[k] = (uint8_t)f;
    __atomic_store_n(&d->head, d->head + 1, __ATOMIC_SEQ_CST);
    wake(c, &c->sleeping, &c->ready);
}

/* Something for the poll thread: a chunk to diff, or every helper done with the job. */
static int helpers_moved(const struct tcpi_core *c)
{
    int all_done = 1;
    for (uint32_t i = 1; i < c->n_dumpers; i++) {
        const struct dumper *d = &c->dumpers[i];
        if (__atomic_load_n(&d->head, __ATOMIC_SEQ_CST) != d->tail)
            return 1;
        all_done &= __atomic_load_n(&d->done_job, __ATOMIC_SEQ_CST) == c->job;
    }
    return all_done;
}

/* Diffs the chunks the helpers have handed over (poll thread only): between its
 * own recvs, and with wait after its own dumps, until every helper is done. */
static void diff_helpers(struct tcpi_core *c, int wait)
{
    for (;;) {
        int pending = 0;
        for (uint32_t i = 1; i < c->n_dumpers; i++) {
            struct dumper *d = &c->dumpers[i];
            /* done first: once it is seen, head covers every chunk of the job */
            int done = __atomic_load_n(&d->done_job, __ATOMIC_ACQUIRE) == c->job;
            uint32_t head = __atomic_load_n(&d->head, __ATOMIC_ACQUIRE), tail = d->tail;
            if (tail == head) {
                pending |= !done;
                continue;
            }
            int64_t t0 = now_ns(CLOCK_MONOTONIC);
            for (; tail != head; tail++) {
                uint32_t k = tail % RING;
                int f = d->ring_family[k];
                c->source = (int)(2 * i) + f;
                if (d->diff_ok[f] && walk(c, d->ring_seq[k], d->port_id, d->ring[k],
                                          d->ring_len[k], &d->diffed[f], PROCESS, NULL) < 0)
                    d->diff_ok[f] = 0;
            }
            __atomic_store_n(&d->tail, tail, __ATOMIC_SEQ_CST);
            wake(c, &d->sleeping, &c->space);
            if (wait)   /* between recvs, the poll thread's dump time already has it */
                c->dumpers[0].busy_ns += now_ns(CLOCK_MONOTONIC) - t0;
            pending |= !done;
        }
        if (!wait || !pending)
            return;
        pthread_mutex_lock(&c->mu);
        __atomic_store_n(&c->sleeping, 1, __ATOMIC_SEQ_CST);
        while (!helpers_moved(c))
            pthread_cond_wait(&c->ready, &c->mu);
        __atomic_store_n(&c->sleeping, 0, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&c->mu);
    }
}

/* The poll thread's own stats for family slot f. */
static struct tcpi_family_stats *own_stats(struct tcpi_core *c, int f)
{
    return f ? &c->result.inet : &c->result.inet6;
}

/* Gives each record the end of the dump it came in (its thread's dump of its
 * family), as upstream stamps a family's records. */
static void stamp(struct tcpi_core *c)
{
    for (uint32_t i = 0; i < c->changed.n; i++) {
        struct tcpi_record *r = &c->changed.v[i];
        int64_t source = -r->realtime_ns - 1;
        uint32_t thread = (uint32_t)(source / 2);
        int f = (int)(source % 2);
        const struct tcpi_family_stats *st = thread ? &c->dumpers[thread].st[f] : own_stats(c, f);
        r->realtime_ns = st->end_realtime_ns;
    }
}

static int dump(struct tcpi_core *c, struct dumper *d, uint8_t family, uint32_t states,
                struct tcpi_family_stats *st, enum walk_mode mode, int64_t *count)
{
    int64_t t0 = now_ns(CLOCK_MONOTONIC), waited = 0;
    int f = slot_of_family(family);
    int rc = -1;
    memset(st, 0, sizeof(*st));
    if (send_request(d, c->ext, family, states) < 0) {
        st->status = TCPI_E_SYSCALL;
        st->errno_value = errno;
        goto out;
    }
    for (;;) {
        int trunc;
        uint8_t *buf = mode == STREAM ? free_slot(c, d, &waited) : d->buf;
        ssize_t n = recv_some(d, buf, &trunc);
        if (n < 0 || trunc) {
            st->status = n < 0 ? TCPI_E_SYSCALL : TCPI_E_TRUNCATED;
            st->errno_value = n < 0 ? errno : EMSGSIZE;
            break;
        }
        st->recvs++;
        if (mode == PROCESS)
            c->source = f;   /* PROCESS runs on the poll thread only: thread 0 */
        int w = walk(c, d->seq, d->port_id, buf, (uint32_t)n, st, mode, count);
        if (w >= 0 && mode == STREAM)
            hand_over(c, d, f, (uint32_t)n);
        if (mode == PROCESS)
            diff_helpers(c, 0);   /* what the helpers brought meanwhile */
        if (w != 0) {
            rc = w > 0 ? 0 : -1;
            break;
        }
    }
out:
    if (rc < 0)
        reset_socket(d);
    st->end_realtime_ns = now_ns(CLOCK_REALTIME);
    st->duration_ns = now_ns(CLOCK_MONOTONIC) - t0;
    if (mode != COUNT)   /* benchmarks and audits are not a poll's work */
        d->busy_ns += st->duration_ns - waited;
    return rc;
}

/* Dumps a thread's share of family slot f; a skipped family counts as done (it is
 * not this thread's), with empty stats.  Returns 1 if the share is complete. */
static int dump_share(struct tcpi_core *c, struct dumper *d, int f,
                      struct tcpi_family_stats *st, enum walk_mode mode)
{
    if (d->prog[f].skip) {
        memset(st, 0, sizeof(*st));
        return 1;
    }
    return dump(c, d, FAMILIES[f], c->states, st, mode, NULL) == 0;
}

static void *helper_main(void *arg)
{
    struct dumper *d = arg;
    struct tcpi_core *c = d->core;
    uint32_t seen = d->job_seen;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (c->job == seen && !c->quit)
            pthread_cond_wait(&c->go, &c->mu);
        if (c->quit)
            break;
        seen = c->job;
        pthread_mutex_unlock(&c->mu);
        for (int f = 0; f < 2; f++)
            d->ok[f] = dump_share(c, d, f, &d->st[f], STREAM);
        pthread_mutex_lock(&c->mu);
        __atomic_store_n(&d->done_job, seen, __ATOMIC_SEQ_CST);
        pthread_cond_broadcast(&c->ready);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* A family's stats over all threads: counts add up, the first failure and the
 * latest end stand, and the duration is the longest thread's. */
static void merge_stats(struct tcpi_family_stats *into, const struct tcpi_family_stats *from)
{
    into->messages += from->messages;
    into->excluded += from->excluded;
    into->bad += from->bad;
    into->recvs += from->recvs;
    if (!into->status && from->status) {
        into->status = from->status;
        into->errno_value = from->errno_value;
    }
    into->interrupted |= from->interrupted;
    if (from->end_realtime_ns > into->end_realtime_ns)
        into->end_realtime_ns = from->end_realtime_ns;
    if (from->duration_ns > into->duration_ns)
        into->duration_ns = from->duration_ns;
}

/* A dumper with its socket; a helper (ring != 0) also gets its ring buffers. */
static int dumper_init(struct tcpi_core *c, struct dumper *d, int ring)
{
    memset(d, 0, sizeof(*d));
    d->fd = -1;
    d->core = c;
    d->buf_size = c->recv_size;
    int ok = (d->buf = malloc(d->buf_size)) != NULL;
    for (int k = 0; ring && ok && k < RING; k++)
        ok = (d->ring[k] = malloc(d->buf_size)) != NULL;
    if (!ok) {   /* the caller's dumper_free releases what was allocated */
        errno = ENOMEM;
        return -1;
    }
    return open_socket(d);
}

static void dumper_free(struct dumper *d)
{
    if (d->fd >= 0)
        close(d->fd);
    free(d->buf);
    free(d->prog[0].code);
    free(d->prog[1].code);
    for (int k = 0; k < RING; k++)
        free(d->ring[k]);
}

static void stop_helpers(struct tcpi_core *c)
{
    pthread_mutex_lock(&c->mu);
    c->quit = 1;
    pthread_cond_broadcast(&c->go);
    pthread_mutex_unlock(&c->mu);
    for (uint32_t i = 1; i < c->n_dumpers; i++) {
        pthread_join(c->dumpers[i].thread, NULL);
        dumper_free(&c->dumpers[i]);
    }
    c->quit = 0;
    c->n_dumpers = c->n_dumpers ? 1 : 0;
}

/* ---- destroy notifications ------------------------------------------------ */

/* Handles one message from the destroy groups: the kernel's last view of a socket
 * being freed (state CLOSE, tcp_info and little else). */
static int on_destroyed(struct tcpi_core *c, const uint8_t *p, uint32_t n, int64_t now_real)
{
    struct tcpi_destroy_stats *st = &c->result.destroy;
    struct attrs a;
    st->received++;
    if (n < IDM_LEN || parse_attrs(p, n, &a) < 0) {
        st->bad++;
        return 0;
    }
    if (filtered_out(c, p)) {
        st->excluded++;
        return 0;
    }
    uint64_t cookie = cookie_of(p);
    struct entry *e = table_find(&c->tbl, cookie);
    uint8_t kind;
    if (e->used && e->fate != LIVE) {
        st->late++;
        return 0;
    }
    if (e->used) {
        kind = TCPI_FINAL;
        st->final++;
        drop_data(e);
    } else {
        int created;
        if (p[6] == 0 && p[7] == 0) {   /* no peer: a socket that never connected */
            st->excluded++;
            return 0;
        }
        if (!(e = table_get(&c->tbl, cookie, &created)) || remember_short(c, p) < 0)
            return -1;
        kind = TCPI_SHORT;
        st->shortflow++;
        e->family = p[0];
    }
    e->fate = FINISHED;
    e->epoch = c->epoch;   /* kept until a completed dump no longer shows the cookie */
    return report(c, &c->destroyed, p, n, cookie, p[0], kind, now_real);
}

/* Appends one recv to the queue (lock held); 0 if there is no room. */
static int enqueue(struct dqueue *q, const uint8_t *p, uint32_t n, int64_t realtime_ns)
{
    /* Items start 8-byte aligned, so their headers and netlink messages are aligned. */
    uint32_t need = (uint32_t)sizeof(struct queued) + ((n + 7u) & ~7u);
    if (q->len + need > q->cap) {
        uint32_t ncap = q->cap ? q->cap : 65536;
        while (ncap < q->len + need)
            ncap *= 2;
        if (ncap > QUEUE_MAX)
            return 0;
        uint8_t *nb = realloc(q->buf, ncap);
        if (!nb)
            return 0;
        q->buf = nb;
        q->cap = ncap;
    }
    struct queued *h = (struct queued *)(q->buf + q->len);
    h->len = n;
    h->realtime_ns = realtime_ns;
    memcpy(h + 1, p, n);
    q->len += need;
    return 1;
}

/* The reader thread: waits for notifications and queues every one at once. */
static void *destroy_reader(void *arg)
{
    struct tcpi_core *c = arg;
    struct dqueue *q = &c->dq;
    uint8_t *buf = malloc(c->recv_size);
    struct pollfd fds[2] = {{.fd = c->dfd, .events = POLLIN}, {.fd = q->stop_fd[0], .events = POLLIN}};
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);   /* signals are the Python thread's */
    while (buf) {
        if (poll(fds, 2, -1) < 0 && errno != EINTR)
            break;
        if (fds[1].revents)
            break;
        for (;;) {
            struct sockaddr_nl sa;
            struct iovec iov = {buf, c->recv_size};
            struct msghdr mh = {.msg_name = &sa, .msg_namelen = sizeof(sa), .msg_iov = &iov,
                                .msg_iovlen = 1};
            ssize_t n = recvmsg(c->dfd, &mh, MSG_DONTWAIT);
            int e = n < 0 ? errno : 0;
            if (e == EINTR)
                continue;
            if (e == EAGAIN || e == EWOULDBLOCK)
                break;
            pthread_mutex_lock(&q->mu);
            int was_empty = q->len == 0;
            if (e == ENOBUFS)                   /* the kernel dropped notifications */
                q->overruns++;
            else if (e)
                q->errno_value = e;
            else if (sa.nl_pid != 0 || (mh.msg_flags & MSG_TRUNC))
                q->bad++;
            else if (!enqueue(q, buf, (uint32_t)n, now_ns(CLOCK_REALTIME)))
                q->overruns++;
            int wake = was_empty && q->len > 0;
            pthread_mutex_unlock(&q->mu);
            if (wake)
                (void)!write(q->wake_fd, &(uint64_t){1}, sizeof(uint64_t));
            if (e && e != ENOBUFS)
                break;
        }
    }
    free(buf);
    return NULL;
}

/* Handles every queued destroy notification. */
static void drain_destroyed(struct tcpi_core *c)
{
    struct dqueue *q = &c->dq;
    if (!q->running)
        return;
    struct tcpi_destroy_stats *st = &c->result.destroy;
    uint64_t ignored;
    pthread_mutex_lock(&q->mu);
    uint8_t *items = q->buf;
    uint32_t len = q->len, cap = q->cap;
    q->buf = c->taken;            /* the reader fills the other buffer meanwhile */
    q->cap = c->taken_cap;
    q->len = 0;
    st->overruns += q->overruns;
    st->bad += q->bad;
    if (q->errno_value)
        st->errno_value = q->errno_value;
    q->overruns = q->bad = 0;
    q->errno_value = 0;
    (void)!read(q->wake_fd, &ignored, sizeof(ignored));   /* empty now: not readable */
    pthread_mutex_unlock(&q->mu);
    c->taken = items;
    c->taken_cap = cap;
    for (uint32_t at = 0; at < len;) {
        const struct queued *h = (const struct queued *)(items + at);
        const uint8_t *b = (const uint8_t *)(h + 1);
        for (uint32_t pos = 0; pos + sizeof(struct nlmsghdr) <= h->len;) {
            const struct nlmsghdr *m = (const struct nlmsghdr *)(b + pos);
            if (m->nlmsg_len < sizeof(*m) || m->nlmsg_len > h->len - pos) {
                st->bad++;
                break;
            }
            if (m->nlmsg_type == SOCK_DIAG_BY_FAMILY &&
                on_destroyed(c, (const uint8_t *)(m + 1), m->nlmsg_len - sizeof(*m),
                             h->realtime_ns) < 0)
                st->errno_value = ENOMEM;
            pos += NLMSG_ALIGN(m->nlmsg_len);
        }
        at += (uint32_t)sizeof(*h) + ((h->len + 7u) & ~7u);
    }
}

/* Stops the reader thread and closes the listener. */
static void destroy_stop(struct tcpi_core *c)
{
    struct dqueue *q = &c->dq;
    if (q->running) {
        (void)!write(q->stop_fd[1], "x", 1);
        pthread_join(q->thread, NULL);
        q->running = 0;
    }
    for (int i = 0; i < 2; i++)
        if (q->stop_fd[i] >= 0)
            close(q->stop_fd[i]);
    if (q->wake_fd >= 0)
        close(q->wake_fd);
    if (c->dfd >= 0)
        close(c->dfd);
    q->stop_fd[0] = q->stop_fd[1] = q->wake_fd = c->dfd = -1;
    free(q->buf);
    free(c->taken);
    q->buf = c->taken = NULL;
    q->len = q->cap = c->taken_cap = 0;
}

/* After the dumps: connections of a completed family that were not seen. */
static void sweep(struct tcpi_core *c, int ok6, int ok4, int64_t now_real)
{
    int64_t now = now_ns(CLOCK_MONOTONIC);
    for (uint32_t i = 0; i < c->tbl.cap;) {
        struct entry *e = &c->tbl.slots[i];
        int done = e->family == AF_INET6 ? ok6 : ok4;
        if (e->used && e->fate == HELD && done) {
            int gone = e->epoch != c->epoch;
            if (!gone && now_real - e->since_ns < c->grace_ns) {
                i++;
                continue;
            }
            if (recently_short(c, e->data)) {
                settle_remnant(c, e);
            } else {   /* unclaimed: a connection of its own, as upstream records it */
                if (report(c, &c->changed, e->data, e->len, e->cookie, e->family,
                           TCPI_PREVIOUS_WAS_NIL, e->since_ns) < 0)
                    break;
                e->fate = LIVE;
                e->since_ns = 0;
            }
        }
        if (!e->used || e->epoch == c->epoch || !done) {
            i++;
            continue;
        }
        if (e->fate == LIVE && c->dfd >= 0 && (e->since_ns == 0 || now - e->since_ns < c->grace_ns)) {
            if (e->since_ns == 0)
                e->since_ns = now;  /* give its destroy notification time to arrive */
            i++;
            continue;
        }
        if (e->fate == CLOSED && now - e->since_ns < CLOSED_KEEP_NS) {
            i++;
            continue;
        }
        if (e->fate == LIVE) {
            if (report(c, &c->gone, e->data, e->len, e->cookie, e->family, TCPI_NO_CHANGE,
                       now_real) < 0)
                break;
            drop_data(e);
            if (c->dfd >= 0) {      /* wait for a late notification */
                e->fate = CLOSED;
                e->since_ns = now;
                i++;
                continue;
            }
        }
        table_delete_at(&c->tbl, i);  /* slot i now holds a shifted entry: re-examine */
    }
    forget_shortflows(c, now);
}

static void reset_result(struct tcpi_core *c)
{
    /* The first poll of a busy host reports every socket; do not keep that much
     * memory for the idle polls that follow. */
    if (c->arena.cap > (1u << 20) && c->arena.len < c->arena.cap / 4) {
        free(c->arena.data);
        c->arena.data = NULL;
        c->arena.cap = 0;
    }
    c->arena.len = 0;
    c->changed.n = c->gone.n = c->destroyed.n = 0;
    memset(&c->result.destroy, 0, sizeof(c->result.destroy));
    memset(&c->result.inet6, 0, sizeof(c->result.inet6));
    memset(&c->result.inet, 0, sizeof(c->result.inet));
}

static void publish(struct tcpi_core *c, struct tcpi_poll_result **out)
{
    struct tcpi_poll_result *r = &c->result;
    r->records = c->changed.v;
    r->n_records = c->changed.n;
    r->vanished = c->gone.v;
    r->n_vanished = c->gone.n;
    r->destroyed = c->destroyed.v;
    r->n_destroyed = c->destroyed.n;
    r->data = c->arena.data;
    r->data_len = c->arena.len;
    r->tracked = c->tbl.count;
    *out = r;
}

/* ---- public API ---------------------------------------------------------- */

struct tcpi_core *tcpi_core_new(uint32_t recv_size, int *err)
{
    struct tcpi_core *c = calloc(1, sizeof(*c));
    if (!c) {
        *err = ENOMEM;
        return NULL;
    }
    c->recv_size = recv_size < MIN_RECV ? MIN_RECV : recv_size;
    c->ext = 0xFF;
    c->states = 0x0F37;
    c->exclude_local = 1;
    c->dfd = -1;
    c->dq.wake_fd = c->dq.stop_fd[0] = c->dq.stop_fd[1] = -1;
    pthread_mutex_init(&c->dq.mu, NULL);
    c->netns = open(THREAD_NETNS, O_RDONLY | O_CLOEXEC);   /* -1 without /proc: no switching */
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->go, NULL);
    pthread_cond_init(&c->ready, NULL);
    pthread_cond_init(&c->space, NULL);
    c->dumpers = calloc(1, sizeof(*c->dumpers));
    if (!c->dumpers || table_grow(&c->tbl) < 0 || table_grow(&c->shortflows) < 0) {
        *err = ENOMEM;
        tcpi_core_free(c);
        return NULL;
    }
    c->n_dumpers = 1;
    if (dumper_init(c, &c->dumpers[0], 0) < 0) {
        *err = errno;
        tcpi_core_free(c);
        return NULL;
    }
    return c;
}

void tcpi_core_free(struct tcpi_core *c)
{
    if (!c)
        return;
    if (c->dumpers) {
        stop_helpers(c);
        if (c->n_dumpers)
            dumper_free(&c->dumpers[0]);
        free(c->dumpers);
    }
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->go);
    pthread_cond_destroy(&c->ready);
    pthread_cond_destroy(&c->space);
    destroy_stop(c);
    pthread_mutex_destroy(&c->dq.mu);
    if (c->netns >= 0)
        close(c->netns);
    for (uint32_t i = 0; i < c->tbl.cap; i++)
        free(c->tbl.slots[i].data);
    free(c->tbl.slots);
    free(c->shortflows.slots);
    free(c->dstip);
    free(c->incl_net);
    free(c->arena.data);
    free(c->changed.v);
    free(c->gone.v);
    free(c->destroyed.v);
    free(c);
}

void tcpi_set_request(struct tcpi_core *c, uint8_t ext, uint32_t states)
{
    c->ext = ext;
    c->states = states;
}

int tcpi_set_program(struct tcpi_core *c, uint32_t thread, uint8_t family, int skip,
                     const uint8_t *bc, uint32_t len)
{
    if (thread >= c->n_dumpers || len > 65535 - NLA_HDRLEN ||
        (family != AF_INET && family != AF_INET6))
        return -1;
    struct program *prog = &c->dumpers[thread].prog[slot_of_family(family)];
    uint8_t *copy = NULL;
    if (len) {
        copy = calloc(1, NLA_ALIGN(len));
        if (!copy)
            return -1;
        memcpy(copy, bc, len);
    }
    free(prog->code);
    prog->code = copy;
    prog->len = len;
    prog->skip = skip != 0;
    return 0;
}

int tcpi_set_threads(struct tcpi_core *c, uint32_t n, int *err)
{
    if (n < 1 || n > MAX_THREADS) {
        *err = EINVAL;
        return -1;
    }
    stop_helpers(c);
    struct dumper *v = realloc(c->dumpers, n * sizeof(*v));
    if (!v) {
        *err = ENOMEM;
        return -1;
    }
    c->dumpers = v;
    for (uint32_t i = 1; i < n; i++) {
        struct dumper *d = &c->dumpers[i];
        int rc = dumper_init(c, d, 1);
        d->job_seen = c->job;   /* polls only run on this thread: no lock needed */
        if (rc == 0 && (rc = pthread_create(&d->thread, NULL, helper_main, d)) != 0)
            errno = rc;
        if (rc != 0) {
            *err = errno;
            dumper_free(d);
            stop_helpers(c);
            return -1;
        }
        c->n_dumpers = i + 1;
    }
    return 0;
}

void tcpi_port_histogram(struct tcpi_core *c, uint8_t family, uint32_t *local, uint32_t *remote)
{
    memset(local, 0, 256 * sizeof(*local));
    memset(remote, 0, 256 * sizeof(*remote));
    for (uint32_t i = 0; i < c->tbl.cap; i++) {
        const struct entry *e = &c->tbl.slots[i];
        if (e->used && e->fate == LIVE && e->len >= IDM_LEN && e->data[0] == family) {
            local[e->data[4]]++;   /* the high byte of the big-endian port */
            remote[e->data[6]]++;
        }
    }
}

void tcpi_exclude_local(struct tcpi_core *c, int on) { c->exclude_local = on; }

void tcpi_exclude_srcport(struct tcpi_core *c, uint16_t port)
{
    c->srcport[port >> 3] |= (uint8_t)(1u << (port & 7));
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
    return add_net(&c->dstip, &c->n_dstip, family, addr, family == AF_INET ? 32 : 128);
}

int tcpi_include_net(struct tcpi_core *c, uint8_t family, const uint8_t *addr, uint8_t bits)
{
    return add_net(&c->incl_net, &c->n_incl_net, family, addr, bits);
}

void tcpi_include_ports(struct tcpi_core *c, uint16_t first, uint16_t last)
{
    for (uint32_t port = first; port <= last; port++)
        c->incl_port[port >> 3] |= (uint8_t)(1u << (port & 7));
    c->any_incl_port = 1;
}

void tcpi_filter_clear(struct tcpi_core *c)
{
    memset(c->srcport, 0, sizeof(c->srcport));
    memset(c->incl_port, 0, sizeof(c->incl_port));
    c->any_incl_port = 0;
    c->n_dstip = c->n_incl_net = 0;
}

void tcpi_forget_all(struct tcpi_core *c)
{
    for (uint32_t i = 0; i < c->tbl.cap; i++) {
        free(c->tbl.slots[i].data);
        memset(&c->tbl.slots[i], 0, sizeof(c->tbl.slots[i]));
    }
    c->tbl.count = 0;
    memset(c->shortflows.slots, 0, c->shortflows.cap * sizeof(*c->shortflows.slots));
    c->shortflows.count = 0;
}

int tcpi_poll(struct tcpi_core *c, struct tcpi_poll_result **out)
{
    c->epoch++;
    reset_result(c);
    drain_destroyed(c);
    if (c->n_dumpers > 1) {
        for (uint32_t i = 1; i < c->n_dumpers; i++) {
            struct dumper *d = &c->dumpers[i];
            memset(d->diffed, 0, sizeof(d->diffed));
            d->diff_ok[0] = d->diff_ok[1] = 1;
        }
        pthread_mutex_lock(&c->mu);
        c->job++;
        pthread_cond_broadcast(&c->go);
        pthread_mutex_unlock(&c->mu);
    }
    struct dumper *d0 = &c->dumpers[0];
    int ok[2];
    ok[0] = dump_share(c, d0, 0, own_stats(c, 0), PROCESS);
    drain_destroyed(c);
    ok[1] = dump_share(c, d0, 1, own_stats(c, 1), PROCESS);
    diff_helpers(c, 1);
    stamp(c);   /* before the merge: each thread's own end times */
    for (int f = 0; f < 2; f++) {
        int dumped = !d0->prog[f].skip;
        for (uint32_t i = 1; i < c->n_dumpers; i++) {
            struct dumper *d = &c->dumpers[i];
            merge_stats(own_stats(c, f), &d->st[f]);
            merge_stats(own_stats(c, f), &d->diffed[f]);
            ok[f] = ok[f] && d->ok[f] && d->diff_ok[f];
            dumped |= !d->prog[f].skip;
        }
        ok[f] = ok[f] && dumped;   /* a family no thread dumped was not seen complete */
    }
    drain_destroyed(c);
    sweep(c, ok[0], ok[1], now_ns(CLOCK_REALTIME));
    publish(c, out);
    return (ok[0] || ok[1]) ? 0 : -1;
}

int tcpi_drain(struct tcpi_core *c, struct tcpi_poll_result **out)
{
    reset_result(c);
    drain_destroyed(c);
    publish(c, out);
    return (int)c->destroyed.n;
}

int tcpi_destroy_listen(struct tcpi_core *c, uint32_t rcvbuf, int64_t grace_ns, int *err)
{
    struct dqueue *q = &c->dq;
    if (c->dfd >= 0) {
        c->grace_ns = grace_ns;
        return q->wake_fd;
    }
    int fd = netns_socket(c, SOCK_NONBLOCK);
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
    int groups[] = {SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY};
    if (fd < 0)
        goto fail;
    c->dfd = fd;
    int size = (int)(rcvbuf > INT32_MAX / 2 ? INT32_MAX / 2 : rcvbuf);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));  /* capped by rmem_max */
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        goto fail;
    for (int i = 0; i < 2; i++)
        if (setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &groups[i], sizeof(int)) < 0)
            goto fail;
    if ((q->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0 ||
        pipe2(q->stop_fd, O_CLOEXEC) < 0)
        goto fail;
    int rc = pthread_create(&q->thread, NULL, destroy_reader, c);
    if (rc != 0) {
        errno = rc;
        goto fail;
    }
    q->running = 1;
    c->grace_ns = grace_ns;
    return q->wake_fd;
fail:
    *err = errno;
    destroy_stop(c);
    return -1;
}

uint32_t tcpi_destroy_rcvbuf(struct tcpi_core *c)
{
    int size = 0;
    socklen_t len = sizeof(size);
    if (c->dfd < 0 || getsockopt(c->dfd, SOL_SOCKET, SO_RCVBUF, &size, &len) < 0)
        return 0;
    return (uint32_t)size;
}

int tcpi_check_bytecode(struct tcpi_core *c, uint32_t thread, uint8_t family)
{
    struct tcpi_family_stats st;
    int64_t count = 0;
    if (thread >= c->n_dumpers || (family != AF_INET && family != AF_INET6))
        return EINVAL;
    if (dump(c, &c->dumpers[thread], family, 0, &st, COUNT, &count) == 0)
        return 0;
    return st.errno_value ? st.errno_value : EPROTO;
}

int tcpi_compare(const uint8_t *cur, uint32_t n, const uint8_t *prev, uint32_t plen)
{
    uint8_t kind;
    if (n < IDM_LEN || plen < IDM_LEN || diff(cur, n, prev, plen, &kind) < 0)
        return -1;
    return kind;
}

/* ---- archive lines -------------------------------------------------------- */

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
    int has_info = a.nslots > INFO_SLOT && a.present[INFO_SLOT];
    *info_off = has_info ? a.off[INFO_SLOT] : 0;
    *info_len = has_info ? a.len[INFO_SLOT] : 0;
    return o - out;
}

void tcpi_release_memory(void)
{
    malloc_trim(0);
}

void tcpi_thread_busy(struct tcpi_core *c, int64_t *ns, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        ns[i] = i < c->n_dumpers ? c->dumpers[i].busy_ns : 0;
        if (i < c->n_dumpers)
            c->dumpers[i].busy_ns = 0;
    }
}

int64_t tcpi_count_dump(struct tcpi_core *c, uint8_t family, int *err)
{
    struct tcpi_family_stats st;
    int64_t count = 0;
    if (dump(c, &c->dumpers[0], family, c->states, &st, COUNT, &count) < 0) {
        *err = st.errno_value ? st.errno_value : EPROTO;
        return -1;
    }
    return count;
}
