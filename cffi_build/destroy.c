/*
 * destroy.c - the kernel's TCP destroy notifications: a reader thread queues them
 * as they come, the poll thread turns them into final records and short flows.
 */
#define _GNU_SOURCE
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define QUEUE_MAX (64u << 20)  /* destroy notifications waiting for the poll thread */

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
    if (filter_drops(&c->filter, p)) {
        st->excluded++;
        return 0;
    }
    uint64_t cookie = idm_cookie(p);
    struct entry *e = table_find(&c->tbl, cookie);
    uint8_t kind;
    if (e->used && e->fate != LIVE) {
        st->late++;
        return 0;
    }
    if (e->used) {
        kind = TCPI_FINAL;
        st->final++;
        count_bytes(c, p, n, e);
        entry_drop(e);
    } else {
        int created;
        if (idm_dport(p) == 0) {   /* no peer: a socket that never connected */
            st->excluded++;
            return 0;
        }
        if (!(e = table_get(&c->tbl, cookie, &created)) || remember_short(c, p) < 0)
            return -1;
        kind = TCPI_SHORT;
        st->shortflow++;
        count_bytes(c, p, n, NULL);
        e->family = idm_family(p);
    }
    e->fate = FINISHED;
    e->epoch = c->epoch;   /* kept until a completed dump no longer shows the cookie */
    return result_add(c, &c->destroyed, p, n, cookie, idm_family(p), kind, now_real);
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
    struct dqueue *q = &c->destroy.q;
    uint8_t *buf = malloc(c->recv_size);
    struct pollfd fds[2] = {{.fd = c->destroy.fd, .events = POLLIN}, {.fd = q->stop_fd[0], .events = POLLIN}};
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
            ssize_t n = recvmsg(c->destroy.fd, &mh, MSG_DONTWAIT);
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
void drain_destroyed(struct tcpi_core *c)
{
    struct dqueue *q = &c->destroy.q;
    if (!q->running)
        return;
    struct tcpi_destroy_stats *st = &c->result.destroy;
    uint64_t ignored;
    pthread_mutex_lock(&q->mu);
    uint8_t *items = q->buf;
    uint32_t len = q->len, cap = q->cap;
    q->buf = c->destroy.taken;            /* the reader fills the other buffer meanwhile */
    q->cap = c->destroy.taken_cap;
    q->len = 0;
    st->overruns += q->overruns;
    st->bad += q->bad;
    if (q->errno_value)
        st->errno_value = q->errno_value;
    q->overruns = q->bad = 0;
    q->errno_value = 0;
    (void)!read(q->wake_fd, &ignored, sizeof(ignored));   /* empty now: not readable */
    pthread_mutex_unlock(&q->mu);
    c->destroy.taken = items;
    c->destroy.taken_cap = cap;
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
void destroy_stop(struct tcpi_core *c)
{
    struct dqueue *q = &c->destroy.q;
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
    if (c->destroy.fd >= 0)
        close(c->destroy.fd);
    q->stop_fd[0] = q->stop_fd[1] = q->wake_fd = c->destroy.fd = -1;
    free(q->buf);
    free(c->destroy.taken);
    q->buf = c->destroy.taken = NULL;
    q->len = q->cap = c->destroy.taken_cap = 0;
}

int tcpi_destroy_listen(struct tcpi_core *c, uint32_t rcvbuf, int64_t grace_ns, int *err)
{
    struct dqueue *q = &c->destroy.q;
    if (c->destroy.fd >= 0) {
        c->destroy.grace_ns = grace_ns;
        return q->wake_fd;
    }
    int fd = netns_socket(c, SOCK_NONBLOCK);
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
    int groups[] = {SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY};
    if (fd < 0)
        goto fail;
    c->destroy.fd = fd;
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
    c->destroy.grace_ns = grace_ns;
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
    if (c->destroy.fd < 0 || getsockopt(c->destroy.fd, SOL_SOCKET, SO_RCVBUF, &size, &len) < 0)
        return 0;
    return (uint32_t)size;
}
