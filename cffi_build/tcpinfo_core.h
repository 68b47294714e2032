/*
 * tcpinfo_core.h - the C core of tcpinfo: inet_diag dumps of every TCP socket (sweeps)
 * and exact look-ups of the active ones, diffed against what was seen before in C, so
 * Python only sees what changed.
 *
 * The one header of the core.  Between the CDEF markers it is the C interface and
 * the text that cffi_build/build_core.py hands to cffi (keep that part plain: no
 * preprocessor conditionals, no macros with expressions).  After them come the
 * declarations the core's own files share, one section per file:
 *   table.c     the snapshot table (keyed by cookie) and the result arena
 *   message.c   one message's attributes, upstream's Compare, the layout
 *   filter.c    which sockets are left out, in userspace
 *   netlink.c   sockets in the core's namespace, requests, receives
 *   remnants.c  time-wait remnants of short flows
 *   poll.c      the dumps, the diff, the sweep; the core's life cycle
 *   lookup.c    the fast tier: exact look-ups of the active connections
 *   threads.c   dump threads and the ring that feeds the poll thread
 *   destroy.c   destroy notifications: reader thread and queue
 *   encode.c    archive lines from messages (the archive writer's, not the poller's)
 *   lines.c     archive lines in Go's shape: strings, base64, time
 *   csv.c       csvtool's row loop (upstream's schema)
 *   columns.c   the export's row loop (column buffers)
 * Python owns every policy; this is the per-socket loop.
 */
#ifndef TCPINFO_CORE_H
#define TCPINFO_CORE_H

#include <stdint.h>

/* CDEF-BEGIN */

/* Why a record was reported: upstream's ChangeType values (UPSTREAM.md 3.3). */
enum tcpi_change {
    TCPI_NO_CHANGE = 0,
    TCPI_STATE_CHANGE = 1,
    TCPI_NO_TCPINFO = 2,
    TCPI_NEW_ATTRIBUTE = 3,
    TCPI_LOST_ATTRIBUTE = 4,
    TCPI_ATTRIBUTE_LENGTH = 5,
    TCPI_STATE_OR_COUNTER = 6,
    TCPI_PACKET_COUNT = 7,
    TCPI_PREVIOUS_WAS_NIL = 8,
    TCPI_OTHER = 9,
    /* Not upstream's: records that come from a destroy notification. */
    TCPI_FINAL = 10,       /* the last tcp_info of a connection a poll had seen */
    TCPI_SHORT = 11        /* a connection that opened and closed between two polls */
};

/* Why a family's dump failed (tcpi_family_stats.status); 0 = complete. */
enum tcpi_status {
    TCPI_OK = 0,
    TCPI_E_SYSCALL = 1,    /* send/recv failed; errno_value says why */
    TCPI_E_SEQ = 2,        /* reply with the wrong sequence number */
    TCPI_E_PID = 3,        /* reply for another port id */
    TCPI_E_NLMSG_ERROR = 4,/* the kernel answered NLMSG_ERROR; errno_value */
    TCPI_E_TRUNCATED = 5,  /* malformed or truncated netlink framing */
    TCPI_E_NOMEM = 6
};

/* One socket that is new, changed, or (in the vanished list) gone. */
struct tcpi_record {
    uint32_t offset;   /* into tcpi_poll_result.data */
    uint32_t length;   /* 72-byte inet_diag_msg followed by its attributes */
    uint64_t cookie;
    int64_t realtime_ns; /* when the kernel said so: the end of the family's dump, the
                            receipt of the destroy notification, or the end of the poll
                            that declared the connection vanished */
    uint8_t family;    /* AF_INET or AF_INET6 */
    uint8_t kind;      /* enum tcpi_change; TCPI_NO_CHANGE for vanished */
};

struct tcpi_family_stats {
    uint32_t messages;    /* inet_diag messages received (before exclusion) */
    uint32_t excluded;    /* dropped by the exclusion rules */
    uint32_t bad;         /* messages skipped: too short, bad attributes, wrong type */
    uint32_t recvs;       /* recvmsg calls that returned data */
    int32_t status;       /* enum tcpi_status */
    int32_t errno_value;  /* errno or NLMSG_ERROR code when status != 0 */
    uint8_t interrupted;  /* NLM_F_DUMP_INTR seen: the dump may be inconsistent */
    int64_t end_realtime_ns;  /* wall clock when the dump finished (record Timestamp) */
    int64_t duration_ns;      /* monotonic time spent in this family's dump */
};

/* Destroy notifications handled by one poll or drain. */
struct tcpi_destroy_stats {
    uint32_t received;    /* SOCK_DIAG_BY_FAMILY messages from the destroy groups */
    uint32_t final;       /* closed a tracked connection (TCPI_FINAL) */
    uint32_t shortflow;   /* a connection no poll had seen (TCPI_SHORT) */
    uint32_t excluded;    /* filtered out, or without a peer (never connected) */
    uint32_t late;        /* for a connection already closed by a poll, or twice */
    uint32_t bad;         /* malformed */
    uint32_t overruns;    /* notifications lost: ENOBUFS (the kernel's buffer was full),
                             or the core's 64 MiB queue was full */
    uint32_t remnants;    /* time-wait remnants of short flows under cookies of their
                             own, recognised by the 4-tuple and never reported */
    int32_t errno_value;  /* last unexpected receive error, 0 if none */
};

/* What one refresh (the fast tier's exact look-ups) did. */
struct tcpi_lookup_stats {
    uint32_t asked;       /* look-ups sent */
    uint32_t changed;     /* answered with a changed message (reported) */
    uint32_t unchanged;   /* answered, nothing Compare reads moved */
    uint32_t missing;     /* ENOENT, or a state the sweeps do not dump: left to the sweep
                             and the destroy notifications, never reported closed here */
    uint32_t left;        /* left the fast tier: idle for too many look-ups, or missing */
    uint32_t bad;         /* malformed or unexpected answers */
    uint32_t sends;       /* sendmsg calls (each carries up to 16 look-ups) */
    int32_t status;       /* enum tcpi_status of the first failure, 0 if none */
    int32_t errno_value;
    int64_t duration_ns;  /* monotonic time the refresh took */
    int64_t end_realtime_ns;   /* the records' Timestamp */
};

struct tcpi_poll_result {
    struct tcpi_record *records;   /* new or changed, in dump order (IPv6 first; with dump
                                      threads the helpers' interleaved with the poll
                                      thread's, chunk by chunk) */
    uint32_t n_records;
    struct tcpi_record *vanished;  /* payload = last snapshot seen */
    uint32_t n_vanished;
    struct tcpi_record *destroyed; /* TCPI_FINAL or TCPI_SHORT, payload = the kernel's last word */
    uint32_t n_destroyed;
    struct tcpi_destroy_stats destroy;
    uint8_t *data;                 /* arena holding every payload above */
    uint32_t data_len;
    uint32_t tracked;              /* connections in the snapshot table after the poll */
    uint32_t active;               /* connections in the fast tier after the poll or refresh */
    uint32_t joined;               /* connections that joined the fast tier in this poll */
    uint64_t bytes_sent;           /* tcp_info bytes_sent and bytes_received moved since each */
    uint64_t bytes_received;       /* reported connection's previous record: upstream's rates */
    uint8_t one_walk;              /* the sweep dumped both families in one walk */
    struct tcpi_family_stats inet6;
    struct tcpi_family_stats inet;
    struct tcpi_lookup_stats lookup;   /* tcpi_refresh only */
};

struct tcpi_core;

/* Opens the NETLINK_SOCK_DIAG socket kept for every poll.  recv_size is the
 * receive buffer (raised to at least 32 KiB).  Returns NULL with *err = errno. */
struct tcpi_core *tcpi_core_new(uint32_t recv_size, int *err);
void tcpi_core_free(struct tcpi_core *core);

/* Request shape: upstream sends ext 0xFF and states 0x0F37. */
void tcpi_set_request(struct tcpi_core *core, uint8_t ext, uint32_t states);

/* Sets what one dump thread (0: the poll's own) asks of one family (AF_INET or
 * AF_INET6): skip != 0 dumps nothing of it (another thread takes the whole family);
 * else an inet_diag bytecode program (INET_DIAG_REQ_BYTECODE) goes with the
 * requests, so the kernel filters before serializing; len 0 sends none.  The
 * kernel audits the program: a rejected one makes each of that thread's dumps of
 * the family fail with NLMSG_ERROR EINVAL.  A family that no thread dumps is never
 * reported vanished. */
int tcpi_set_program(struct tcpi_core *core, uint32_t thread, uint8_t family, int skip,
                     const uint8_t *bytecode, uint32_t len);

/* Splits each poll's dumps over n threads (1 to 16): the poll's own and n - 1
 * helpers, each with its own netlink socket.  Each thread dumps a family with its
 * own program or skips it; together the programs must select disjoint shares that
 * cover the family (ports are the usual key: they never change).  Helpers only
 * receive and hand each buffer over; the poll thread diffs them between its own
 * receives, so the snapshot table has one owner.  The wall time of a poll then
 * approaches 1/n of the kernel's work. */
int tcpi_set_threads(struct tcpi_core *core, uint32_t n, int *err);

/* How the tracked connections of one family spread over ports, by the high byte of
 * the local and of the remote port (256 buckets each): what shares are chosen from. */
void tcpi_port_histogram(struct tcpi_core *core, uint8_t family, uint32_t *local,
                         uint32_t *remote);

/* Each dump thread's time spent dumping since the last call (ns[i] for thread i, 0
 * past the last thread), then restarts the counts: how the shares are balanced. */
void tcpi_thread_busy(struct tcpi_core *core, int64_t *ns, uint32_t n);

/* The userspace filter.  Exclusions are checked in upstream's order (source port,
 * local address, destination IP); then, if include lists are set, a socket is kept
 * only when one of its ends is in an included network and one of its ports in an
 * included range.  Addresses follow inet_diag bytecode's host conditions, so that
 * the kernel and this filter agree: family AF_INET with 4 address bytes matches
 * AF_INET sockets and dual-stack AF_INET6 sockets in ::ffff:a.b.c.d form; AF_INET6
 * with 16 bytes matches AF_INET6 sockets only.  prefix_len is in bits. */
void tcpi_exclude_local(struct tcpi_core *core, int on);
void tcpi_exclude_srcport(struct tcpi_core *core, uint16_t port);
int tcpi_exclude_dstip(struct tcpi_core *core, uint8_t family, const uint8_t *addr);
int tcpi_include_net(struct tcpi_core *core, uint8_t family, const uint8_t *addr,
                     uint8_t prefix_len);
void tcpi_include_ports(struct tcpi_core *core, uint16_t first, uint16_t last);
void tcpi_filter_clear(struct tcpi_core *core);

/* Dumps AF_INET6 then AF_INET, diffs against the previous poll, and fills *out.
 * With a destroy listener, pending notifications are handled before, between and
 * after the two dumps.  *out stays valid until the next poll or drain.
 * Returns 0, or -1 if both families failed. */
int tcpi_poll(struct tcpi_core *core, struct tcpi_poll_result **out);

/* Subscribes to the sock_diag TCP destroy groups (IPv4 and IPv6; no privileges
 * needed), so that the kernel's final tcp_info of every socket is recorded as it
 * dies.  rcvbuf: the receive buffer wanted (SO_RCVBUFFORCE when permitted, else
 * SO_RCVBUF up to net.core.rmem_max).  A thread of the core reads the notifications
 * as they come and queues them (up to 64 MiB) for the poll thread, so that the
 * kernel's buffer never waits for a busy poll.  A connection missing from a
 * completed dump is then reported vanished only after grace_ns without a
 * notification (the kernel sends it from a work queue, and a socket that the
 * application still holds in CLOSE state leaves the dump before it is destroyed).
 * Returns a descriptor that is readable while notifications wait, to wait on
 * between polls, or -1 with *err = errno. */
int tcpi_destroy_listen(struct tcpi_core *core, uint32_t rcvbuf, int64_t grace_ns, int *err);
/* The receive buffer the kernel granted the destroy listener (bytes), 0 if none. */
uint32_t tcpi_destroy_rcvbuf(struct tcpi_core *core);

/* Sweeps dump both families in one walk of the kernel's table (the compat
 * TCPDIAG_GETSOCK request: the same messages, attributes and bytecode) whenever the
 * poll thread alone dumps both families with the same program; else one dump per
 * family, as upstream does.  Off by default (upstream's two dumps). */
void tcpi_set_one_walk(struct tcpi_core *core, int on);

/* The fast tier.  With idle_lookups > 0, every connection a sweep (but the first, which
 * finds every connection new) finds new or changed joins the active set, which
 * tcpi_refresh looks up exactly, one socket at a time by its id and cookie
 * (SOCK_DIAG_BY_FAMILY without NLM_F_DUMP, 16 per send); a
 * connection leaves it after idle_lookups look-ups in a row found nothing changed, or
 * when a look-up misses it.  0 empties the set and turns the tier off. */
void tcpi_set_fast_tier(struct tcpi_core *core, uint32_t idle_lookups);

/* Looks up the active connections, diffs each against its last message, and fills
 * *out: records (changed ones), destroyed (notifications handled meanwhile), lookup
 * stats and active; no family stats, no vanished (a miss is left to the next sweep).
 * Returns 0, or -1 if the look-ups failed (lookup.status says why). */
int tcpi_refresh(struct tcpi_core *core, struct tcpi_poll_result **out);

/* Handles pending destroy notifications without polling; fills *out (only the
 * destroyed list and destroy stats).  Returns the number of records. */
int tcpi_drain(struct tcpi_core *core, struct tcpi_poll_result **out);

/* Forget every tracked connection (the next poll reports all as new). */
void tcpi_forget_all(struct tcpi_core *core);

/* Copies the last message the polls reported for an open connection (the stored copy
 * Compare reads) into out.  Returns its length, 0 if the cookie is not an open
 * connection, or minus the length needed if cap is too small.  Poll thread only. */
int64_t tcpi_snapshot(struct tcpi_core *core, uint64_t cookie, uint8_t *out, uint32_t cap);

/* Upstream's Compare(current, previous) on two inet_diag payloads, as each poll
 * applies it: an enum tcpi_change, or -1 if either is malformed.  by: 0 with the
 * previous message (the table keeps messages), 1 with its image as polls take it (the
 * table keeps images: without a walk when the layout is the same), 2 with images of
 * both, always walked. */
int tcpi_compare(const uint8_t *cur, uint32_t cur_len, const uint8_t *prev, uint32_t prev_len,
                 int by);

/* Writes one ArchivalRecord JSON line (UPSTREAM.md 4), byte for byte as upstream:
 * {"Timestamp":"<ts>","RawIDM":"<base64 of idm[0:72]>","Attributes":[...]}\n
 * with the attributes of payload (72-byte inet_diag_msg + rtattrs) in upstream's
 * slots.  idm may differ from payload's own header (anonymized addresses).
 * info_off and info_len locate INET_DIAG_INFO in payload (offset 0: absent).
 * Returns the line's length, -1 for a malformed payload, -2 if cap is too small
 * (tcpi_encode_bound gives a sufficient cap). */
int64_t tcpi_encode_record(const uint8_t *idm, const uint8_t *payload, uint32_t len,
                           const char *ts, uint32_t ts_len, char *out, uint32_t cap,
                           uint32_t *info_off, uint32_t *info_len);
uint32_t tcpi_encode_bound(uint32_t len, uint32_t ts_len);

/* Returns freed heap memory to the kernel (glibc malloc_trim): after the first
 * poll of a busy host, megabytes of short-lived records would otherwise stay
 * resident.  Cheap enough to call about once a second. */
void tcpi_release_memory(void);

/* Asks the kernel to audit a thread's program for a family with a dump that
 * selects no state (no socket is walked).  Returns 0 if accepted, else the errno
 * it gave. */
int tcpi_check_bytecode(struct tcpi_core *core, uint32_t thread, uint8_t family);

/* The kernel's floor, for benchmarks: the same request and receive loop (thread
 * 0's socket and program for the family, even if it skips it), only counting
 * messages; AF_UNSPEC (0) counts one walk of both families (thread 0's AF_INET6
 * program).  Returns the count, or -1 with *err = errno. */
int64_t tcpi_count_dump(struct tcpi_core *core, uint8_t family, int *err);

/* The kernel structures the core was compiled against, as offsetof gives them:
 * the facts that tcpinfo.kernel.inetdiag and tcpinfo.kernel.tcp state in Python,
 * compared by a test so that the two languages cannot drift apart. */
struct tcpi_layout {
    uint32_t idm_len;     /* sizeof(struct inet_diag_msg) */
    uint32_t idm_family, idm_state, idm_timer, idm_sport, idm_dport, idm_src, idm_dst,
             idm_if, idm_cookie;
    uint32_t max_slot;    /* upstream keeps attribute types 0..max_slot */
    uint32_t info_type;   /* INET_DIAG_INFO */
    uint32_t compared[4]; /* the tcp_info bytes Compare reads: [0, [1]) and [[2], [3]) */
};
void tcpi_layout(struct tcpi_layout *out);

/* ---- csvtool: rows of upstream's CSV (csv.c) -------------------------------
 * The default schema's per-row loop.  Python (tcpinfo/csvtool/upstream.py) owns
 * the column layout, passed in as a schema, and converts every line that C
 * declines: C only takes the canonical line shape Go writes. */

/* How one attribute prints (the Python reference: upstream_csv._FORMATTERS). */
enum tcpi_csv_kind {
    TCPI_CSV_STRUCT = 0,  /* struct members per format, short value zero-padded */
    TCPI_CSV_U8 = 1,      /* first byte; empty: 0, not fully parsed */
    TCPI_CSV_MARK = 2,    /* u32 if exactly 4 bytes, else 0, not fully parsed */
    TCPI_CSV_CONG = 3     /* the name without its last byte (the NUL) */
};

/* The columns of one attribute type, after the IDM columns, in row order. */
struct tcpi_csv_group {
    uint8_t type;         /* INET_DIAG_* attribute printed here */
    uint8_t kind;         /* enum tcpi_csv_kind */
    uint16_t size;        /* STRUCT: bytes the format reads */
    uint16_t go_size;     /* STRUCT: longer values are "not fully parsed" */
    const char *format;   /* STRUCT: Python struct format of upstream's Go struct */
    const char *absent;   /* printed when the attribute is missing */
};

struct tcpi_csv_schema {
    const struct tcpi_csv_group *groups;
    uint32_t n_groups;
    const char *zero_time;     /* a Timestamp equal to this ... */
    const char *zero_time_as;  /* ... prints as this (upstream's metadata-row date) */
};

/* Why tcpi_csv_rows returned. */
enum tcpi_csv_stop {
    TCPI_CSV_DONE = 0,      /* every line converted */
    TCPI_CSV_FULL = 1,      /* out has no room for one more row */
    TCPI_CSV_DECLINED = 2   /* the line at pos is not canonical: Python takes it */
};

struct tcpi_csv_progress {
    uint64_t pos;        /* offset in `in` of the first line not converted */
    uint64_t out_used;   /* bytes of CSV written, whole rows ending in '\n' */
    uint32_t rows;       /* lines converted = rows written */
    int32_t stop;        /* enum tcpi_csv_stop */
};

/* Converts the '\n'-separated lines of in[pos:in_len] into rows in out[0:cap]
 * until the input ends, out is full or a line is declined. */
void tcpi_csv_rows(const struct tcpi_csv_schema *schema, const char *in, uint64_t in_len,
                   uint64_t pos, char *out, uint64_t cap, struct tcpi_csv_progress *progress);

/* ---- export: columns of the snapshots shape (columns.c) --------------------
 * The export's per-row loop: lines in the shape csvtool's loop takes, into
 * column buffers that Python allocates (numpy arrays, zeroed) and turns into
 * Arrow columns.  Python owns the schema: which attribute types are kept and
 * how many bytes of each.  A block is taken whole or not at all. */
struct tcpi_columns {
    const char *zero_time;  /* a Timestamp equal to this is null */
    int64_t *time_ns;       /* per row: the Timestamp in ns since 1970, UTC ... */
    uint8_t *time_null;     /* ... or 1: the zero time */
    uint8_t *idm;           /* per row, idm_len bytes: the RawIDM's first */
    uint32_t idm_len;
    uint32_t n_types;       /* attribute types 0 .. n_types - 1 are kept */
    uint8_t **values;       /* per type: rows x widths[t] bytes, a value's first (or NULL) */
    const uint32_t *widths;
    int32_t *lengths;       /* rows x n_types: each value's decoded length, -1 absent */
};

/* Fills rows first_row .. first_row + rows - 1 of cols from in[0:in_len] (the
 * reader's blocks go in one by one, never joined): 1 if that is `rows` lines,
 * each ending in '\n' and each taken; else 0, and nothing it wrote is to be used. */
int tcpi_columns_fill(const char *in, uint64_t in_len, uint32_t first_row, uint32_t rows,
                      const struct tcpi_columns *cols);

/* Numbers the distinct rows of rows[0 : n * width] (n >= 1), in order of first
 * appearance: index[i] is row i's number, first[k] the row where number k first
 * appears.  table is scratch space of `slots` entries, a power of two above n.
 * Returns how many distinct rows (addresses, CONG, SOCKOPT: a few per block,
 * formatted once each). */
uint32_t tcpi_distinct(const uint8_t *rows, uint32_t n, uint32_t width, uint32_t *index,
                       uint32_t *first, uint32_t *table, uint32_t slots);

/* CDEF-END */

/* ===========================================================================
 * Below: what the core's own files share.  Not part of the cffi interface; the
 * core's .c files define TCPINFO_CORE_INTERNAL before including this header.
 * ======================================================================== */
#ifdef TCPINFO_CORE_INTERNAL

#include <pthread.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <linux/inet_diag.h>

/* Shared between the core's files, invisible outside the compiled module. */
#define INTERNAL __attribute__((visibility("hidden")))

#define MIN_RECV 32768u
#define MAX_SLOT 38           /* upstream keeps attribute types 0..38 (2 x its stale INET_DIAG_MAX) */
#define MAX_NETS 1024         /* excluded destinations, included networks */
#define MAX_THREADS 16
#define THREAD_NETNS "/proc/thread-self/ns/net"   /* the calling thread's namespace */
#ifndef RING                  /* (a sanitizer build may shrink it to exercise full rings) */
#define RING 16               /* receive buffers a helper may fill ahead of the poll thread */
#endif

/* ---- one inet_diag message: where its fields are (the kernel's own layout) -- */

#define IDM_LEN ((uint32_t)sizeof(struct inet_diag_msg))
#define IDM_AT(field) offsetof(struct inet_diag_msg, field)

static inline uint8_t idm_family(const uint8_t *m) { return m[IDM_AT(idiag_family)]; }
static inline uint8_t idm_state(const uint8_t *m) { return m[IDM_AT(idiag_state)]; }
static inline uint8_t idm_timer(const uint8_t *m) { return m[IDM_AT(idiag_timer)]; }
static inline const uint8_t *idm_src(const uint8_t *m) { return m + IDM_AT(id.idiag_src); }
static inline const uint8_t *idm_dst(const uint8_t *m) { return m + IDM_AT(id.idiag_dst); }

/* Ports travel in network byte order. */
static inline uint16_t idm_sport(const uint8_t *m)
{
    return (uint16_t)(m[IDM_AT(id.idiag_sport)] << 8 | m[IDM_AT(id.idiag_sport) + 1]);
}

static inline uint16_t idm_dport(const uint8_t *m)
{
    return (uint16_t)(m[IDM_AT(id.idiag_dport)] << 8 | m[IDM_AT(id.idiag_dport) + 1]);
}

/* idiag_cookie is two host-order u32, low word first. */
static inline uint64_t idm_cookie(const uint8_t *m)
{
    uint32_t lo, hi;
    memcpy(&lo, m + IDM_AT(id.idiag_cookie), 4);
    memcpy(&hi, m + IDM_AT(id.idiag_cookie) + 4, 4);
    return (uint64_t)hi << 32 | lo;
}

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

/* What the next poll's Compare needs of a LIVE connection's last message, kept instead
 * of the message while destroy notifications are heard (they bring each connection's
 * final message, so the table need not): 104 bytes instead of about 480.  The bytes
 * Compare reads are kept as hashes of chains of bijective steps (a change of one 8-byte
 * word always changes the hash; anything else collides with odds of 2^-64): those of
 * tcp_info, and all the bytes around the (last) tcp_info attribute as they lie, the
 * other attributes' headers and padding included, so that the next message, if laid out
 * the same, is compared without a walk of its attributes (image_same_layout).
 * Of upstream's change kinds, NewAttribute, LostAttribute, AttributeLength and Other
 * are told apart by presence first, then lengths, then bytes, not slot by slot: all
 * four mean "write", and none reaches an archive (shape, 32 bits, only labels a change
 * that attrs already shows).  Every byte but tcp_info's is hashed, copies of a duplicate
 * and types above MAX_SLOT included (no kernel sends them; upstream reads the last copy
 * and drops the others): at worst an extra record, never a missed one. */
struct image {
    uint64_t info;      /* the tcp_info bytes Compare reads, zero-padded */
    uint64_t attrs;     /* every other byte after the inet_diag_msg, as it lies */
    uint64_t present;   /* bit t: slot t holds an attribute */
    uint64_t sent, received;   /* tcpi_bytes_sent and _received, if counters */
    uint32_t shape;     /* the other attributes' types and lengths, in the kernel's order */
    uint32_t len;       /* the message's length ... */
    struct inet_diag_sockid id;   /* the look-ups ask for it */
    uint8_t family, state, nslots, counters;
    uint16_t info_at, info_len;   /* ... and where its tcp_info attribute is (0: none) */
};

struct entry {
    uint64_t cookie;
    uint8_t *data;     /* LIVE: the last message that changed, or its struct image;
                          HELD: the message */
    uint32_t len, cap; /* len 0 with data set: data is a struct image */
    uint32_t epoch;    /* poll number when last seen */
    uint8_t family;
    uint8_t used;
    uint8_t fate;      /* enum fate */
    uint8_t active;    /* in the fast tier's active set */
    int64_t since_ns;  /* LIVE: first poll that missed it (0: seen); CLOSED: closing time;
                          HELD: when a dump first showed it */
};

static inline const struct image *entry_image(const struct entry *e)
{
    return e->data && !e->len ? (const struct image *)e->data : NULL;
}

static inline uint8_t entry_family(const struct entry *e)
{
    const struct image *img = entry_image(e);
    return img ? img->family : idm_family(e->data);
}

/* The socket id (ports and addresses in network order, interface, cookie). */
static inline const struct inet_diag_sockid *entry_id(const struct entry *e)
{
    const struct image *img = entry_image(e);
    return img ? &img->id : (const struct inet_diag_sockid *)(e->data + IDM_AT(id));
}

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

/* The fast tier (lookup.c): the connections looked up exactly between sweeps. */
struct active {
    uint64_t cookie;
    uint32_t idle;     /* look-ups in a row that found nothing changed */
};

struct tier {
    struct active *v;
    uint32_t n, cap;
    uint32_t idle_lookups;     /* leave after this many idle look-ups; 0: tier off */
    uint8_t *buf;              /* LOOKUP_BATCH receive buffers of LOOKUP_BUF bytes */
};

#define LOOKUP_BATCH 16       /* look-ups per sendmsg */
#define LOOKUP_BUF 8192       /* one answer: a message with every attribute fits */
#define TCPDIAG_GETSOCK 18    /* the compat request: both families in one walk */

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

/* Where each attribute of one message is, in upstream's slots (see parse_attrs). */
struct attrs {
    uint16_t off[MAX_SLOT + 1];
    uint16_t len[MAX_SLOT + 1];
    uint8_t present[MAX_SLOT + 1];
    int nslots;        /* upstream's len(Attributes): min(max type, 38) + 1 */
};

/* What a dump does with each socket's message. */
enum walk_mode {
    PROCESS,   /* filter, diff and report it (the poll thread only) */
    COUNT,     /* count it: the benchmark's bare loop */
    STREAM     /* nothing yet: a helper hands the checked chunk to the poll thread */
};

static inline int64_t now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}


/* ---- the core's state, one part per section ------------------------------ */

/* Which sockets are left out (filter.c). */
struct filter {
    int exclude_local;
    uint8_t srcport[65536 / 8];
    struct net *dstip, *incl_net;
    uint32_t n_dstip, n_incl_net;
    uint8_t incl_port[65536 / 8];
    int any_incl_port;
};

/* The dump threads (threads.c): dumpers[0] is the poll thread's own. */
struct pool {
    struct dumper *dumpers;
    uint32_t n;
    pthread_mutex_t mu;       /* guards job and quit; sleeping on the conditions */
    pthread_cond_t go;        /* a new job, or quit (helpers wait) */
    pthread_cond_t ready;     /* a chunk handed over, or a job finished (poll thread waits) */
    pthread_cond_t space;     /* ring slots freed (helpers wait) */
    uint32_t job;
    int quit;
    int sleeping;             /* the poll thread waits for the helpers */
};

/* The destroy listener (destroy.c). */
struct destroyer {
    int fd;                   /* -1 if none */
    struct dqueue q;          /* what its reader thread received */
    uint8_t *taken;           /* the queue's items being handled (swapped with q.buf) */
    uint32_t taken_cap;
    int64_t grace_ns;
};

struct tcpi_core {
    uint32_t recv_size;
    uint8_t ext;
    uint32_t states;
    uint32_t epoch;           /* polls so far */
    int source;               /* whose message the diff is at: 2 * thread + family slot */
    int one_walk;             /* tcpi_set_one_walk */
    int walking_both;         /* the dump under way is one walk of both families */
    int netns;                /* the network namespace the core was made in, -1 unknown */
    struct filter filter;
    struct pool pool;
    struct destroyer destroy;
    struct table tbl;         /* the snapshot table, keyed by cookie */
    struct table shortflows;  /* 4-tuples of recent short flows (remnants.c) */
    struct arena arena;
    struct recvec changed, gone, destroyed;
    struct tier tier;
    struct tcpi_poll_result result;
};


/* The two table look-ups every socket of every poll makes, inline (table.c has the rest). */
static inline uint32_t table_slot(const struct table *t, uint64_t cookie)
{
    /* Fibonacci hashing spreads the kernel's sequential cookies. */
    return (uint32_t)((cookie * 0x9E3779B97F4A7C15ull) >> 32) & (t->cap - 1);
}

/* Finds the cookie's entry, or the empty slot where it belongs (used == 0). */
static inline struct entry *table_find(struct table *t, uint64_t cookie)
{
    uint32_t j = table_slot(t, cookie);
    while (t->slots[j].used && t->slots[j].cookie != cookie)
        j = (j + 1) & (t->cap - 1);
    return &t->slots[j];
}

/* table.c: the snapshot table and the result being built */
INTERNAL int table_grow(struct table *t);
INTERNAL struct entry *table_get(struct table *t, uint64_t cookie, int *created);
INTERNAL void table_delete_at(struct table *t, uint32_t i);
INTERNAL int entry_store(struct entry *e, const uint8_t *p, uint32_t n);
INTERNAL int entry_store_image(struct entry *e, const struct image *img);
INTERNAL void entry_drop(struct entry *e);
INTERNAL int result_add(struct tcpi_core *c, struct recvec *v, const uint8_t *p, uint32_t n,
                        uint64_t cookie, uint8_t family, uint8_t kind, int64_t realtime_ns);

/* message.c: attributes and upstream's Compare */
INTERNAL int parse_attrs(const uint8_t *p, uint32_t n, struct attrs *a);
INTERNAL int diff(const uint8_t *cur, uint32_t n, const uint8_t *prev, uint32_t plen,
                  uint8_t *kind);
INTERNAL int image_make(const uint8_t *p, uint32_t n, struct image *img);
INTERNAL uint8_t image_compare(const struct image *cur, const struct image *prev);
INTERNAL int image_same_layout(const uint8_t *p, uint32_t n, const struct image *prev,
                               struct image *img, uint8_t *kind);
INTERNAL void count_bytes(struct tcpi_core *c, const uint8_t *cur, uint32_t n,
                          const struct entry *prev);

/* filter.c */
INTERNAL int filter_drops(const struct filter *f, const uint8_t *idm);

/* netlink.c: sockets, requests, receives */
INTERNAL int family_slot(uint8_t family);
INTERNAL int netns_socket(struct tcpi_core *c, int flags);
INTERNAL int open_socket(struct dumper *d);
INTERNAL void reset_socket(struct dumper *d);
INTERNAL int send_request(struct dumper *d, uint8_t ext, uint8_t family, uint32_t states);
INTERNAL int send_iov(struct dumper *d, struct iovec *iov, size_t n_iov, size_t total);
INTERNAL ssize_t recv_some(struct dumper *d, uint8_t *buf, int *truncated);

/* remnants.c: time-wait remnants of short flows */
INTERNAL int remember_short(struct tcpi_core *c, const uint8_t *idm);
INTERNAL int recently_short(struct tcpi_core *c, const uint8_t *idm);
INTERNAL void settle_remnant(struct tcpi_core *c, struct entry *e);
INTERNAL void forget_shortflows(struct tcpi_core *c, int64_t now);
INTERNAL int hold_timewait(struct tcpi_core *c, const uint8_t *p, uint32_t n, uint64_t cookie);

/* poll.c: the diff and the dumps */
INTERNAL int take_message(struct tcpi_core *c, const uint8_t *p, uint32_t n,
                          struct tcpi_family_stats *st);   /* a look-up's answer, as a dump's */
INTERNAL void reset_result(struct tcpi_core *c);
INTERNAL void publish(struct tcpi_core *c, struct tcpi_poll_result **out);
INTERNAL int walk(struct tcpi_core *c, uint32_t seq, uint32_t port_id, const uint8_t *b,
                  uint32_t n, struct tcpi_family_stats *st, enum walk_mode mode, int64_t *count);
INTERNAL int dump_share(struct tcpi_core *c, struct dumper *d, int f,
                        struct tcpi_family_stats *st, enum walk_mode mode);

/* threads.c: dump threads */
INTERNAL uint8_t *free_slot(struct tcpi_core *c, struct dumper *d, int64_t *waited);
INTERNAL void hand_over(struct tcpi_core *c, struct dumper *d, int f, uint32_t n);
INTERNAL void diff_helpers(struct tcpi_core *c, int wait);
INTERNAL void merge_stats(struct tcpi_family_stats *into, const struct tcpi_family_stats *from);
INTERNAL int dumper_init(struct tcpi_core *c, struct dumper *d, int ring);
INTERNAL void dumper_free(struct dumper *d);
INTERNAL void stop_helpers(struct tcpi_core *c);

/* lookup.c: the fast tier */
INTERNAL int tier_join(struct tcpi_core *c, struct entry *e);
INTERNAL int64_t lookup_message(struct tcpi_core *c, const struct entry *e, uint8_t *out,
                                uint32_t cap);
INTERNAL void tier_free(struct tcpi_core *c);

/* destroy.c: destroy notifications */
INTERNAL void drain_destroyed(struct tcpi_core *c);
INTERNAL void destroy_stop(struct tcpi_core *c);

/* lines.c: archive lines in the shape Go's encoder writes */
#define MAX_ATTRS 64     /* longer Attributes arrays are declined (upstream writes 39 at most) */
#define TIME_MAX 35      /* "2006-01-02T15:04:05.999999999-07:00" */

/* A JSON string value of the line, between its quotes (NULL text: null). */
struct span {
    const uint8_t *text;
    uint32_t len;
};

struct line {
    struct span ts, idm;
    struct span attrs[MAX_ATTRS];
    int64_t size[MAX_ATTRS];  /* decoded length of each present attribute */
    uint32_t n_attrs;
};

struct instant {
    int64_t seconds;   /* UTC, since 1970 */
    int32_t nanos;
};

/* Splits the canonical line shape into its strings; 0 if it is not that shape. */
INTERNAL int parse_line(const uint8_t *p, const uint8_t *end, struct line *l);
INTERNAL int span_is(const struct span *s, const char *text);   /* equal to that text */
INTERNAL int64_t b64_size(const struct span *s);
INTERNAL int b64_decode(const struct span *s, uint8_t *out, uint32_t cap);
INTERNAL int canonical_time(const struct span *ts, struct instant *at);

#endif /* TCPINFO_CORE_INTERNAL */

#endif
