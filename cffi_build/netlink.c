/*
 * netlink.c - NETLINK_SOCK_DIAG sockets in the core's namespace, dump requests and
 * receives.
 */
#define _GNU_SOURCE
#define TCPINFO_CORE_INTERNAL
#include "tcpinfo_core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

static int in_netns(int ns_fd)
{
    struct stat a, b;
    return fstat(ns_fd, &a) == 0 && stat(THREAD_NETNS, &b) == 0 && a.st_ino == b.st_ino &&
           a.st_dev == b.st_dev;
}

/* A NETLINK_SOCK_DIAG socket in the namespace the core was made in, even when the
 * calling thread has moved since (tests and tools move threads between
 * namespaces; a socket belongs to the namespace it was created in, forever). */
int netns_socket(struct tcpi_core *c, int flags)
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

int open_socket(struct dumper *d)
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
void reset_socket(struct dumper *d)
{
    close(d->fd);
    d->fd = -1;
    open_socket(d);
}

int family_slot(uint8_t family)
{
    return family == AF_INET6 ? 0 : 1;
}

/* Sends thread d's dump request for a family with its program; AF_UNSPEC asks for both
 * families in one walk with the compat request (struct inet_diag_req, the same
 * attributes and bytecode), taking the AF_INET6 slot's program. */
int send_request(struct dumper *d, uint8_t ext, uint8_t family, uint32_t states)
{
    const struct program *prog = &d->prog[family == AF_UNSPEC ? 0 : family_slot(family)];
    struct {
        struct nlmsghdr nh;
        union {
            struct inet_diag_req_v2 v2;
            struct inet_diag_req compat;
        } req;
        struct nlattr bc;
    } msg;
    memset(&msg, 0, sizeof(msg));
    size_t head = sizeof(msg.nh);
    msg.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    msg.nh.nlmsg_seq = ++d->seq;
    if (family == AF_UNSPEC) {
        msg.nh.nlmsg_type = TCPDIAG_GETSOCK;
        msg.req.compat.idiag_ext = ext;
        msg.req.compat.idiag_states = states;
        head += sizeof(msg.req.compat);
    } else {
        msg.nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
        msg.req.v2.sdiag_family = family;
        msg.req.v2.sdiag_protocol = IPPROTO_TCP;
        msg.req.v2.idiag_ext = ext;
        msg.req.v2.idiag_states = states;
        head += sizeof(msg.req.v2);
    }
    msg.nh.nlmsg_len = (uint32_t)NLMSG_ALIGN(head);
    struct iovec iov[3] = {{&msg, msg.nh.nlmsg_len}, {&msg.bc, 0}, {prog->code, 0}};
    if (prog->len) {
        msg.bc.nla_type = INET_DIAG_REQ_BYTECODE;
        msg.bc.nla_len = (uint16_t)(NLA_HDRLEN + prog->len);
        msg.nh.nlmsg_len += NLA_HDRLEN + NLA_ALIGN(prog->len);
        iov[1].iov_len = NLA_HDRLEN;
        iov[2].iov_len = NLA_ALIGN(prog->len);  /* buffer is allocated aligned */
    }
    return send_iov(d, iov, 3, msg.nh.nlmsg_len);
}

/* Sends one netlink datagram to the kernel (opening the socket again if a failure
 * closed it).  Returns 0 if all of it went. */
int send_iov(struct dumper *d, struct iovec *iov, size_t n_iov, size_t total)
{
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    struct msghdr mh = {.msg_name = &kernel, .msg_namelen = sizeof(kernel), .msg_iov = iov,
                        .msg_iovlen = n_iov};
    if (d->fd < 0 && open_socket(d) < 0)
        return -1;
    ssize_t r;
    do
        r = sendmsg(d->fd, &mh, 0);
    while (r < 0 && errno == EINTR);
    return r == (ssize_t)total ? 0 : -1;
}

ssize_t recv_some(struct dumper *d, uint8_t *buf, int *truncated)
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
