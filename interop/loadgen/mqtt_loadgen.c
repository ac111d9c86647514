/*
 * mqtt_loadgen: a lean MQTT 3.1.1 load generator for comparing brokers (Tidegate, Mosquitto, amqtt) with a client
 * that is not the bottleneck.
 *
 * One process, one thread, one epoll loop over non-blocking raw sockets with a minimal MQTT 3.1.1 encoder/decoder
 * (CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK, PINGREQ, DISCONNECT): no library, no per-message allocation, one
 * clock read per batch. Publishers publish to <topic>/<n>, every subscriber subscribes <topic>/# (each gets every
 * message). Each payload starts with a 24-byte header (magic, publisher index, sequence number, send time on
 * CLOCK_MONOTONIC), so subscribers count lost and duplicated messages per publisher and measure end-to-end latency;
 * publishers measure publish-to-PUBACK latency. The rest of the payload is zeros.
 *
 * Prints one JSON object (same key names as `tidegate bench mqtt --json` where they mean the same) including the
 * generator's own CPU time (getrusage): client_cpu_share near 1.0 means the generator used a whole core and may be
 * what limits the rate.
 *
 * Build: cc -O2 -o mqtt_loadgen mqtt_loadgen.c   (Linux; no dependencies)
 * Run:   mqtt_loadgen --port 1883 --qos 1 --duration 8 [--publishers N] [--subscribers M] [--size 256]
 *                     [--inflight 100] [--rate R] [--drain-timeout 10] [--max-drain 60] [--topic T]
 *                     [--host 127.0.0.1]
 * Defaults: QoS 1, 1 publisher, 1 subscriber, 256-byte payloads, 8 s, max rate, 100 QoS 1 publishes in flight per
 * publisher. After the run it waits for every PUBACK and then for the subscribers to have every acknowledged message,
 * each wait ending after --drain-timeout seconds without progress, and both after --max-drain (60) seconds in all.
 * Exit status 1 when the JSON lists errors (a QoS 1 message lost, any duplicate, a connection closed, the drain cut
 * short), 2 on bad arguments or a failed connect.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD_MAGIC 0x47444754u /* "TGDG" little-endian */
#define PAYLOAD_HEADER 24         /* magic u32, publisher u32, seq u64, send time ns u64 */
#define KEEP_ALIVE_S 60
#define PING_AFTER_NS (20ull * 1000000000ull) /* idle writer sends PINGREQ well inside the keep-alive */
#define BATCH_BYTES (256u * 1024u)            /* a max-rate publisher builds at most this much per send */
#define PUMP_BATCHES 4                        /* ...and this many sends per turn before serving other sockets */
#define READ_BYTES (1u << 20)
#define MAX_EVENTS 256
#define CONNECT_TIMEOUT_S 10

enum role { PUBLISHER, SUBSCRIBER };

/* --------------------------------------------------------------------------------------------- small helpers */
static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "mqtt_loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) die("out of memory (%zu bytes)", n);
    return q;
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory");
    return p;
}

/* ------------------------------------------------------------------------------------- latency histogram
 * The same log-linear buckets as tidegate.gateway.bench.latency.BenchLatencies: exact below 128 µs, then 64 buckets
 * per power of two (relative error under 1.6%). */
#define SUB_BUCKETS 64
#define LINEAR_LIMIT (2 * SUB_BUCKETS)
#define N_BUCKETS (LINEAR_LIMIT + 58 * SUB_BUCKETS)

typedef struct {
    uint64_t counts[N_BUCKETS];
    uint64_t count, max_us;
} histogram;

static int bucket_of(uint64_t us) {
    if (us < LINEAR_LIMIT) return (int)us;
    int shift = 64 - __builtin_clzll(us) - 7;
    int b = LINEAR_LIMIT + (shift - 1) * SUB_BUCKETS + (int)((us >> shift) - SUB_BUCKETS);
    return b < N_BUCKETS ? b : N_BUCKETS - 1;
}

static uint64_t upper_bound(int b) {
    if (b < LINEAR_LIMIT) return (uint64_t)b;
    int shift = (b - LINEAR_LIMIT) / SUB_BUCKETS + 1, rest = (b - LINEAR_LIMIT) % SUB_BUCKETS;
    return (((uint64_t)rest + SUB_BUCKETS + 1) << shift) - 1;
}

static void hist_record(histogram *h, uint64_t ns) {
    uint64_t us = ns / 1000;
    h->counts[bucket_of(us)]++;
    h->count++;
    if (us > h->max_us) h->max_us = us;
}

static uint64_t hist_percentile(const histogram *h, double fraction) {
    if (!h->count) return 0;
    uint64_t wanted = (uint64_t)(fraction * (double)h->count + 0.999999), seen = 0;
    if (wanted < 1) wanted = 1;
    for (int b = 0; b < N_BUCKETS; b++) {
        seen += h->counts[b];
        if (seen >= wanted) {
            uint64_t bound = upper_bound(b);
            return bound < h->max_us ? bound : h->max_us;
        }
    }
    return h->max_us;
}

/* --------------------------------------------------------------------------------------------- bit sets */
typedef struct {
    uint64_t *words;
    size_t n_words;
} bitset;

/* Sets bit `i`; returns its previous value. */
static int bitset_set(bitset *s, uint64_t i) {
    size_t w = (size_t)(i >> 6);
    if (w >= s->n_words) {
        size_t n = s->n_words ? s->n_words : 1024;
        while (n <= w) n *= 2;
        s->words = xrealloc(s->words, n * sizeof(uint64_t));
        memset(s->words + s->n_words, 0, (n - s->n_words) * sizeof(uint64_t));
        s->n_words = n;
    }
    uint64_t bit = 1ull << (i & 63), old = s->words[w] & bit;
    s->words[w] |= bit;
    return old != 0;
}

static uint64_t word_at(const bitset *s, size_t w) { return w < s->n_words ? s->words[w] : 0; }

/* ------------------------------------------------------------------------------------------- connections */
typedef struct {
    uint64_t seq, sent_ns;
    int used;
} inflight_slot;

typedef struct conn {
    int fd, index;
    enum role role;
    int want_out;    /* EPOLLOUT registered */
    int ready;       /* publisher could build more right now (it yielded after PUMP_BATCHES sends) */
    char *wbuf;
    size_t wlen, woff, wcap;
    char *rbuf;
    size_t rlen, rcap;
    uint64_t last_write_ns;
    /* publisher */
    char head[8 + 2 + 256]; /* fixed header, remaining length, topic; PUBLISH packet id and payload follow */
    size_t head_len, packet_len;
    uint64_t seq, acked, last_ack_ns;
    inflight_slot *inflight; /* by packet id (QoS 1) */
    int n_inflight;
    uint16_t next_pid;
    bitset acked_seqs;
    /* subscriber */
    bitset *seen; /* one per publisher */
    uint64_t received, duplicated, foreign, first_ns, last_ns;
} conn;

typedef struct {
    const char *host;
    int port, qos, publishers, subscribers, size, inflight;
    double rate, duration, drain_timeout, max_drain;
    char topic[128];
} options;

static options opt = {"127.0.0.1", 1883, 1, 1, 1, 256, 100, 0.0, 8.0, 10.0, 60.0, ""};
static conn *conns;
static int n_conns, epfd;
static histogram e2e_latency, ack_latency;
static char errors[4096];
static int broken; /* a connection failed: stop the run */

static void add_error(const char *fmt, ...) {
    size_t used = strlen(errors);
    if (used + 8 >= sizeof errors) return;
    if (used) {
        strcat(errors, "\x1f");
        used++;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errors + used, sizeof errors - used, fmt, ap);
    va_end(ap);
}

static size_t put_varint(char *out, size_t n) {
    size_t i = 0;
    do {
        uint8_t byte = n % 128;
        n /= 128;
        out[i++] = (char)(byte | (n ? 0x80 : 0));
    } while (n);
    return i;
}

static size_t put_str(char *out, const char *s) {
    size_t n = strlen(s);
    out[0] = (char)(n >> 8);
    out[1] = (char)(n & 0xff);
    memcpy(out + 2, s, n);
    return n + 2;
}

/* Blocking helpers used only while connecting. */
static void send_all_blocking(int fd, const char *data, size_t len) {
    while (len) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("send during setup: %s", strerror(errno));
        }
        data += n;
        len -= (size_t)n;
    }
}

/* Reads one whole packet (blocking, bounded by SO_RCVTIMEO); returns its first byte, the body in `body`. */
static int read_packet_blocking(int fd, char *body, size_t cap, size_t *body_len) {
    char first;
    if (recv(fd, &first, 1, MSG_WAITALL) != 1) die("no answer from the broker while connecting: %s",
                                                   strerror(errno));
    size_t len = 0, shift = 0;
    for (;;) {
        unsigned char byte;
        if (recv(fd, &byte, 1, MSG_WAITALL) != 1) die("broker closed the connection while connecting");
        len |= (size_t)(byte & 0x7f) << shift;
        shift += 7;
        if (!(byte & 0x80)) break;
    }
    if (len > cap) die("unexpected %zu-byte packet while connecting", len);
    if (len && recv(fd, body, len, MSG_WAITALL) != (ssize_t)len) die("short packet while connecting");
    *body_len = len;
    return (unsigned char)first;
}

/* Sends one packet of type `type` with `body` (n bytes, n <= 512), then reads the answer into `body` (cap bytes):
 * returns the answer's first byte and sets *answer_len. The CONNECT/SUBSCRIBE exchanges before the load starts. */
static int exchange_blocking(int fd, int type, char *body, size_t n, size_t cap, size_t *answer_len) {
    char packet[520];
    packet[0] = (char)type;
    size_t h = 1 + put_varint(packet + 1, n);
    memcpy(packet + h, body, n);
    send_all_blocking(fd, packet, h + n);
    return read_packet_blocking(fd, body, cap, answer_len);
}

static int open_mqtt(const char *client_id) {
    struct addrinfo hints = {0}, *res;
    char port[16];
    snprintf(port, sizeof port, "%d", opt.port);
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(opt.host, port, &hints, &res);
    if (rc) die("%s: %s", opt.host, gai_strerror(rc));
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    struct timeval tv = {CONNECT_TIMEOUT_S, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, res->ai_addr, res->ai_addrlen) < 0) die("connect %s:%d: %s", opt.host, opt.port, strerror(errno));
    freeaddrinfo(res);

    char body[512];
    size_t n = put_str(body, "MQTT");
    body[n++] = 4;    /* MQTT 3.1.1 */
    body[n++] = 0x02; /* clean session */
    body[n++] = 0;
    body[n++] = KEEP_ALIVE_S;
    n += put_str(body + n, client_id);
    size_t len;
    int first = exchange_blocking(fd, 0x10, body, n, sizeof body, &len);
    if (first != 0x20 || len < 2) die("expected CONNACK, got packet type %#x", first);
    if (body[1] != 0) die("CONNECT refused with return code %d", body[1]);
    return fd;
}

static void subscribe_blocking(int fd, const char *filter, int qos) {
    char body[300];
    size_t n = 0;
    body[n++] = 0;
    body[n++] = 1; /* packet id 1 */
    n += put_str(body + n, filter);
    body[n++] = (char)qos;
    size_t len;
    int first = exchange_blocking(fd, 0x82, body, n, sizeof body, &len);
    if (first != 0x90 || len < 3) die("expected SUBACK, got packet type %#x", first);
    if ((unsigned char)body[2] == 0x80) die("subscription to %s refused", filter);
}

static void watch(conn *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    c->want_out = out;
}

static void fail_conn(conn *c, const char *what) {
    if (!broken) add_error("%s %d: %s", c->role == PUBLISHER ? "publisher" : "subscriber", c->index, what);
    broken = 1;
}

/* Writes what is buffered; registers for EPOLLOUT while some of it is left. Returns 1 when the buffer is empty. */
static int flush(conn *c, uint64_t now) {
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            fail_conn(c, strerror(errno));
            return 0;
        }
        c->woff += (size_t)n;
        c->last_write_ns = now;
    }
    if (c->woff == c->wlen) {
        /* Every batch starts at offset 0, and all of a publisher's packets have one length: the zero padding of
         * each payload stays in place between batches and is never rewritten. */
        c->woff = c->wlen = 0;
        if (c->want_out) watch(c, 0);
        return 1;
    }
    if (!c->want_out) watch(c, 1);
    return 0;
}

static void reserve(conn *c, size_t more) {
    if (c->wlen + more > c->wcap) {
        size_t cap = c->wcap ? c->wcap : 4096;
        while (cap < c->wlen + more) cap *= 2;
        c->wbuf = xrealloc(c->wbuf, cap);
        memset(c->wbuf + c->wcap, 0, cap - c->wcap);
        c->wcap = cap;
    }
}

/* ---------------------------------------------------------------------------------------------- publishing */
static int window_room(const conn *p) {
    if (opt.qos == 0) return 1 << 30;
    return opt.inflight - p->n_inflight;
}

static uint16_t take_packet_id(conn *p) {
    do {
        p->next_pid = (uint16_t)(p->next_pid % 65535 + 1);
    } while (p->inflight[p->next_pid].used);
    return p->next_pid;
}

/* Appends `count` PUBLISHes to the write buffer (sent at `now`). */
static void build_publishes(conn *p, int count, uint64_t now) {
    reserve(p, (size_t)count * p->packet_len);
    char *out = p->wbuf + p->wlen;
    for (int i = 0; i < count; i++) {
        memcpy(out, p->head, p->head_len);
        char *payload = out + p->head_len;
        if (opt.qos) {
            uint16_t pid = take_packet_id(p);
            payload[0] = (char)(pid >> 8);
            payload[1] = (char)(pid & 0xff);
            payload += 2;
            p->inflight[pid] = (inflight_slot){p->seq, now, 1};
            p->n_inflight++;
        }
        uint32_t magic = PAYLOAD_MAGIC, index = (uint32_t)p->index;
        memcpy(payload, &magic, 4);
        memcpy(payload + 4, &index, 4);
        memcpy(payload + 8, &p->seq, 8);
        memcpy(payload + 16, &now, 8);
        if (opt.qos == 0) { /* QoS 0: "acknowledged" once handed to the socket, as in tidegate bench */
            bitset_set(&p->acked_seqs, p->seq);
            p->acked++;
            p->last_ack_ns = now;
        }
        p->seq++;
        out += p->packet_len;
    }
    p->wlen += (size_t)count * p->packet_len;
}

/* Max rate: build and send while the socket takes it and the window has room, at most PUMP_BATCHES sends. */
static void pump(conn *p, uint64_t now) {
    p->ready = 0;
    if (p->woff < p->wlen && !flush(p, now)) return;
    int per_batch = (int)(BATCH_BYTES / p->packet_len);
    if (per_batch < 1) per_batch = 1;
    for (int batch = 0; batch < PUMP_BATCHES; batch++) {
        int n = window_room(p);
        if (n <= 0) return;
        if (n > per_batch) n = per_batch;
        build_publishes(p, n, now);
        if (!flush(p, now)) return;
    }
    p->ready = window_room(p) > 0;
}

static void on_puback(conn *p, uint16_t pid, uint64_t now) {
    inflight_slot *slot = &p->inflight[pid];
    if (!slot->used) {
        fail_conn(p, "PUBACK for an unknown packet id");
        return;
    }
    slot->used = 0;
    p->n_inflight--;
    p->acked++;
    p->last_ack_ns = now;
    bitset_set(&p->acked_seqs, slot->seq);
    hist_record(&ack_latency, now - slot->sent_ns);
}

/* ---------------------------------------------------------------------------------------------- receiving */
static void on_publish(conn *s, const unsigned char *body, size_t len, int qos, uint64_t now) {
    if (len < 2) goto foreign;
    size_t topic_len = ((size_t)body[0] << 8) | body[1], at = 2 + topic_len;
    if (qos) {
        if (at + 2 > len) goto foreign;
        uint16_t pid = (uint16_t)((body[at] << 8) | body[at + 1]);
        at += 2;
        reserve(s, 4);
        char *ack = s->wbuf + s->wlen;
        ack[0] = 0x40;
        ack[1] = 2;
        ack[2] = (char)(pid >> 8);
        ack[3] = (char)(pid & 0xff);
        s->wlen += 4;
    }
    if (at + PAYLOAD_HEADER > len) goto foreign;
    uint32_t magic, index;
    uint64_t seq, sent;
    memcpy(&magic, body + at, 4);
    memcpy(&index, body + at + 4, 4);
    memcpy(&seq, body + at + 8, 8);
    memcpy(&sent, body + at + 16, 8);
    if (magic != PAYLOAD_MAGIC || index >= (uint32_t)opt.publishers) goto foreign;
    s->received++;
    if (!s->first_ns) s->first_ns = now;
    s->last_ns = now;
    if (bitset_set(&s->seen[index], seq)) s->duplicated++;
    hist_record(&e2e_latency, now > sent ? now - sent : 0);
    return;
foreign:
    s->foreign++;
}

/* Reads once and handles every whole packet in the buffer. */
static void on_readable(conn *c, uint64_t now) {
    if (c->rcap - c->rlen < 4096) {
        c->rcap *= 2;
        c->rbuf = xrealloc(c->rbuf, c->rcap);
    }
    ssize_t got = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, MSG_DONTWAIT);
    if (got == 0) {
        fail_conn(c, "the broker closed the connection");
        return;
    }
    if (got < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) fail_conn(c, strerror(errno));
        return;
    }
    c->rlen += (size_t)got;
    const unsigned char *buf = (const unsigned char *)c->rbuf;
    size_t at = 0;
    while (at + 2 <= c->rlen) {
        size_t len = 0, shift = 0, i = at + 1;
        int complete = 0;
        while (i < c->rlen && i < at + 5) {
            len |= (size_t)(buf[i] & 0x7f) << shift;
            shift += 7;
            if (!(buf[i++] & 0x80)) {
                complete = 1;
                break;
            }
        }
        if (!complete || i + len > c->rlen) {
            if (complete && i - at + len > c->rcap) { /* a packet larger than the buffer: grow it */
                c->rcap = (i - at + len) * 2;
                c->rbuf = xrealloc(c->rbuf, c->rcap);
                buf = (const unsigned char *)c->rbuf;
            }
            break;
        }
        int type = buf[at] >> 4;
        if (type == 3 && c->role == SUBSCRIBER) {
            on_publish(c, buf + i, len, (buf[at] >> 1) & 3, now);
        } else if (type == 4 && c->role == PUBLISHER && len >= 2) {
            on_puback(c, (uint16_t)((buf[i] << 8) | buf[i + 1]), now);
        } else if (type != 13) { /* PINGRESP needs nothing */
            char what[64];
            snprintf(what, sizeof what, "unexpected packet type %d", type);
            fail_conn(c, what);
            return;
        }
        at = i + len;
    }
    if (at) {
        memmove(c->rbuf, c->rbuf + at, c->rlen - at);
        c->rlen -= at;
    }
    if (c->role == SUBSCRIBER && c->wlen > c->woff) flush(c, now); /* this read's PUBACKs in one write */
}

/* ------------------------------------------------------------------------------------------------ the run */
static void usage(void) {
    fprintf(stderr,
            "usage: mqtt_loadgen [--host H] [--port P] [--qos 0|1] [--publishers N] [--subscribers M] [--size B]\n"
            "                    [--duration S] [--rate R] [--inflight W] [--drain-timeout S] [--max-drain S]\n"
            "                    [--topic T]\n"
            "Publishers publish to <topic>/<n>, each subscriber subscribes <topic>/#. --rate 0 (default) is max\n"
            "rate; --rate R paces R msg/s in total, round robin over the publishers. Defaults: QoS 1, 1 -> 1,\n"
            "256 B, 8 s, inflight 100, drain timeout 10 s (without progress), max drain 60 s (in all).\n"
            "Prints one JSON object.\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    static struct option longs[] = {
        {"host", 1, 0, 'h'},     {"port", 1, 0, 'p'},     {"qos", 1, 0, 'q'},
        {"publishers", 1, 0, 'P'}, {"subscribers", 1, 0, 'S'}, {"size", 1, 0, 's'},
        {"duration", 1, 0, 'd'}, {"rate", 1, 0, 'r'},     {"inflight", 1, 0, 'w'},
        {"drain-timeout", 1, 0, 'D'}, {"max-drain", 1, 0, 'M'}, {"topic", 1, 0, 't'}, {"help", 0, 0, '?'},
        {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'q': opt.qos = atoi(optarg); break;
        case 'P': opt.publishers = atoi(optarg); break;
        case 'S': opt.subscribers = atoi(optarg); break;
        case 's': opt.size = atoi(optarg); break;
        case 'd': opt.duration = atof(optarg); break;
        case 'r': opt.rate = atof(optarg); break;
        case 'w': opt.inflight = atoi(optarg); break;
        case 'D': opt.drain_timeout = atof(optarg); break;
        case 'M': opt.max_drain = atof(optarg); break;
        case 't': snprintf(opt.topic, sizeof opt.topic, "%s", optarg); break;
        default: usage();
        }
    }
    if (optind != argc || opt.port <= 0 || (opt.qos != 0 && opt.qos != 1) || opt.publishers < 1 ||
        opt.subscribers < 0 || opt.size < PAYLOAD_HEADER || opt.duration <= 0 || opt.rate < 0 || opt.inflight < 1 ||
        opt.inflight > 65535 || opt.drain_timeout < 0 || opt.max_drain < 0) {
        if (opt.size < PAYLOAD_HEADER) fprintf(stderr, "mqtt_loadgen: --size must be at least %d\n", PAYLOAD_HEADER);
        usage();
    }
    if (!opt.topic[0]) snprintf(opt.topic, sizeof opt.topic, "loadgen-%d-%llx", (int)getpid(),
                                (unsigned long long)now_ns());
}

static void setup_connections(void) {
    n_conns = opt.subscribers + opt.publishers;
    conns = xcalloc((size_t)n_conns, sizeof(conn));
    epfd = epoll_create1(EPOLL_CLOEXEC);
    char client_id[200], filter[200];
    snprintf(filter, sizeof filter, "%s/#", opt.topic);
    /* Subscribers first: every message published afterwards has somewhere to go. */
    for (int k = 0; k < n_conns; k++) {
        conn *c = &conns[k];
        c->role = k < opt.subscribers ? SUBSCRIBER : PUBLISHER;
        c->index = c->role == SUBSCRIBER ? k : k - opt.subscribers;
        snprintf(client_id, sizeof client_id, "%s-%s-%d", opt.topic, c->role == SUBSCRIBER ? "sub" : "pub",
                 c->index);
        c->fd = open_mqtt(client_id);
        if (c->role == SUBSCRIBER) {
            subscribe_blocking(c->fd, filter, opt.qos);
            c->seen = xcalloc((size_t)opt.publishers, sizeof(bitset));
        } else {
            char topic[200];
            int topic_len = snprintf(topic, sizeof topic, "%s/%d", opt.topic, c->index);
            size_t remaining = 2 + (size_t)topic_len + (opt.qos ? 2 : 0) + (size_t)opt.size;
            c->head[0] = (char)(0x30 | (opt.qos << 1));
            size_t h = 1 + put_varint(c->head + 1, remaining);
            h += put_str(c->head + h, topic);
            c->head_len = h;
            c->packet_len = h + (opt.qos ? 2 : 0) + (size_t)opt.size;
            if (opt.qos) c->inflight = xcalloc(65536, sizeof(inflight_slot));
        }
        c->rcap = READ_BYTES;
        c->rbuf = xrealloc(NULL, c->rcap);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    }
}

static uint64_t total(int role, size_t field_offset) {
    uint64_t sum = 0;
    for (int k = 0; k < n_conns; k++)
        if ((int)conns[k].role == role) sum += *(const uint64_t *)((const char *)&conns[k] + field_offset);
    return sum;
}
#define SUM(role, field) total(role, offsetof(conn, field))

static int all_acked(void) {
    for (int k = 0; k < n_conns; k++)
        if (conns[k].role == PUBLISHER && (conns[k].n_inflight || conns[k].wlen > conns[k].woff)) return 0;
    return 1;
}

static void run(uint64_t *start_ns, uint64_t *produce_end_ns) {
    struct epoll_event events[MAX_EVENTS];
    int timer = -1;
    uint64_t interval_ns = 0, next_slot = 0, slot = 0;
    int turn = 0;
    const int paced = opt.rate > 0;
    if (paced) {
        timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        epoll_ctl(epfd, EPOLL_CTL_ADD, timer, &ev);
        interval_ns = (uint64_t)(1e9 / opt.rate);
    }
    uint64_t start = now_ns(), deadline = start + (uint64_t)(opt.duration * 1e9);
    uint64_t drain_ns = (uint64_t)(opt.drain_timeout * 1e9), max_drain_ns = (uint64_t)(opt.max_drain * 1e9);
    *start_ns = start;
    next_slot = start;
    int producing = 1, acks_done = 0;
    uint64_t last_progress = start, last_count = 0;
    for (int k = 0; k < n_conns; k++) conns[k].last_write_ns = start;
    for (int k = 0; k < n_conns; k++)
        if (conns[k].role == PUBLISHER && !paced) pump(&conns[k], start);

    while (!broken) {
        uint64_t now = now_ns();
        if (producing && now >= deadline) {
            producing = 0;
            *produce_end_ns = now;
            last_progress = now;
        }
        if (!producing) {
            /* Drain: first every QoS 1 publish acknowledged, then every subscriber has everything acknowledged,
             * each phase ending early after drain_timeout without progress. */
            uint64_t count = SUM(PUBLISHER, acked) + SUM(SUBSCRIBER, received);
            if (count != last_count) {
                last_count = count;
                last_progress = now;
            }
            if (!acks_done && all_acked()) acks_done = 1;
            if (acks_done) {
                uint64_t expected = SUM(PUBLISHER, acked) * (uint64_t)opt.subscribers, unique = 0;
                for (int k = 0; k < n_conns; k++)
                    if (conns[k].role == SUBSCRIBER) unique += conns[k].received - conns[k].duplicated;
                if (unique >= expected) break;
            }
            if (now - *produce_end_ns > max_drain_ns) {
                /* QoS 0 at max rate can hand the broker far more than it delivers (TCP only limits what is not yet
                 * read): stop waiting rather than drain for minutes; what is missing then counts as lost. */
                add_error("still draining %.0fs after publishing ended (--max-drain); the rest counts as lost",
                          opt.max_drain);
                break;
            }
            if (now - last_progress > drain_ns) {
                if (!acks_done) add_error("publishes still unacknowledged %.1fs after the last progress",
                                          opt.drain_timeout);
                break;
            }
        }
        if (producing && paced) {
            /* One message per due slot, round robin over publishers with window room; a slot that finds every
             * window full waits for PUBACKs. */
            while (now >= next_slot) {
                conn *chosen = NULL;
                for (int tries = 0; tries < opt.publishers; tries++) {
                    conn *p = &conns[opt.subscribers + (turn + tries) % opt.publishers];
                    if (window_room(p) > 0 && p->wlen == p->woff) {
                        chosen = p;
                        turn = (turn + tries + 1) % opt.publishers;
                        break;
                    }
                }
                if (!chosen) break; /* every window full: the next PUBACK (an epoll event) comes first */
                build_publishes(chosen, 1, now);
                flush(chosen, now);
                slot++;
                next_slot = start + slot * interval_ns;
            }
            if (now < next_slot) { /* else no window room: not armed, or it would fire again at once */
                struct itimerspec when = {{0, 0}, {(time_t)(next_slot / 1000000000ull),
                                                   (long)(next_slot % 1000000000ull)}};
                timerfd_settime(timer, TFD_TIMER_ABSTIME, &when, NULL);
            }
        }
        for (int k = 0; k < n_conns; k++) { /* keep-alive for connections that have not written for a while */
            conn *c = &conns[k];
            if (now - c->last_write_ns > PING_AFTER_NS && c->wlen == c->woff) {
                reserve(c, 2);
                c->wbuf[c->wlen++] = (char)0xC0;
                c->wbuf[c->wlen++] = 0;
                flush(c, now);
            }
        }
        int any_ready = 0;
        for (int k = opt.subscribers; k < n_conns; k++) any_ready |= conns[k].ready;
        int timeout_ms = (producing && !paced && any_ready) ? 0 : 50;
        int n = epoll_wait(epfd, events, MAX_EVENTS, timeout_ms);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        now = now_ns();
        for (int e = 0; e < n; e++) {
            conn *c = events[e].data.ptr;
            if (!c) {
                uint64_t expirations;
                if (read(timer, &expirations, sizeof expirations) < 0) { /* EAGAIN: nothing to take */ }
                continue;
            }
            if (events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c, now);
            if (events[e].events & EPOLLOUT) flush(c, now);
            if (c->role == PUBLISHER && producing && !paced) pump(c, now);
        }
        if (producing && !paced)
            for (int k = opt.subscribers; k < n_conns; k++)
                if (conns[k].ready) pump(&conns[k], now);
    }
    if (producing) *produce_end_ns = now_ns();
    if (timer >= 0) close(timer);
}

static uint64_t popcount_and_not(const bitset *a, const bitset *b) {
    uint64_t n = 0;
    for (size_t w = 0; w < a->n_words; w++) n += (uint64_t)__builtin_popcountll(a->words[w] & ~word_at(b, w));
    return n;
}

static void print_hist(const char *name, const histogram *h) {
    printf("  \"%s\": {\"count\": %llu, \"p50\": %.3f, \"p99\": %.3f, \"p999\": %.3f, \"max\": %.3f},\n", name,
           (unsigned long long)h->count, hist_percentile(h, 0.50) / 1000.0, hist_percentile(h, 0.99) / 1000.0,
           hist_percentile(h, 0.999) / 1000.0, h->max_us / 1000.0);
}

static void print_json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20) printf("\\u%04x", *s);
        else putchar(*s);
    }
    putchar('"');
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    parse_args(argc, argv);
    uint64_t wall_start = now_ns();
    setup_connections();
    uint64_t start_ns = 0, produce_end_ns = 0;
    run(&start_ns, &produce_end_ns);
    uint64_t run_end = now_ns();

    for (int k = 0; k < n_conns; k++) { /* DISCONNECT, best effort */
        const char bye[2] = {(char)0xE0, 0};
        if (send(conns[k].fd, bye, 2, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) { /* the run's result stands anyway */ }
        close(conns[k].fd);
    }

    uint64_t sent = 0, acked = 0, last_ack = 0, received = 0, duplicated = 0, foreign = 0, lost = 0, unacked_seen = 0;
    uint64_t first_receive = 0, last_receive = 0;
    for (int k = 0; k < n_conns; k++) {
        conn *c = &conns[k];
        if (c->role == PUBLISHER) {
            sent += c->seq;
            acked += c->acked;
            if (c->last_ack_ns > last_ack) last_ack = c->last_ack_ns;
            continue;
        }
        received += c->received;
        duplicated += c->duplicated;
        foreign += c->foreign;
        if (c->first_ns && (!first_receive || c->first_ns < first_receive)) first_receive = c->first_ns;
        if (c->last_ns > last_receive) last_receive = c->last_ns;
        for (int p = 0; p < opt.publishers; p++) {
            const bitset *acked_seqs = &conns[opt.subscribers + p].acked_seqs;
            lost += popcount_and_not(acked_seqs, &c->seen[p]);
            unacked_seen += popcount_and_not(&c->seen[p], acked_seqs);
        }
    }
    if (duplicated) add_error("%llu duplicated deliveries (no reconnects happened: none is allowed)",
                              (unsigned long long)duplicated);
    if (lost && opt.qos) add_error("%llu acknowledged QoS 1 deliveries lost", (unsigned long long)lost);

    double produce_s = last_ack > start_ns ? (last_ack - start_ns) / 1e9 : 0;
    double consume_s = last_receive > first_receive ? (last_receive - first_receive) / 1e9 : 0;
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double user = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6;
    double sys = usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
    double wall = (run_end - wall_start) / 1e9, run_s = (run_end - start_ns) / 1e9;

    printf("{\n  \"loadgen\": \"c\",\n");
    printf("  \"options\": {\"host\": ");
    print_json_string(opt.host);
    printf(", \"port\": %d, \"qos\": %d, \"publishers\": %d, \"subscribers\": %d, \"size\": %d, \"rate\": %g, "
           "\"duration\": %g, \"inflight\": %d, \"drain_timeout\": %g, \"max_drain\": %g, \"protocol_level\": 4, "
           "\"topic\": ",
           opt.port, opt.qos, opt.publishers, opt.subscribers, opt.size, opt.rate, opt.duration, opt.inflight,
           opt.drain_timeout, opt.max_drain);
    print_json_string(opt.topic);
    printf("},\n");
    printf("  \"sent\": %llu,\n  \"acked\": %llu,\n  \"failed\": 0,\n  \"received\": %llu,\n",
           (unsigned long long)sent, (unsigned long long)acked, (unsigned long long)received);
    if (opt.subscribers)
        printf("  \"lost\": %llu,\n  \"duplicated\": %llu,\n  \"received_unacked\": %llu,\n",
               (unsigned long long)lost, (unsigned long long)duplicated, (unsigned long long)unacked_seen);
    else
        printf("  \"lost\": null,\n  \"duplicated\": null,\n  \"received_unacked\": null,\n");
    printf("  \"foreign\": %llu,\n", (unsigned long long)foreign);
    printf("  \"produce_seconds\": %.3f,\n  \"consume_seconds\": %.3f,\n", produce_s, consume_s);
    printf("  \"publish_msgs_per_s\": %.0f,\n", produce_s > 0 ? acked / produce_s : 0.0);
    printf("  \"receive_msgs_per_s\": %.0f,\n", consume_s > 0 ? received / consume_s : 0.0);
    print_hist("latency_ms", &e2e_latency);
    print_hist("ack_latency_ms", &ack_latency);
    printf("  \"client_cpu_s\": {\"user\": %.3f, \"system\": %.3f, \"total\": %.3f},\n", user, sys, user + sys);
    printf("  \"client_wall_s\": %.3f,\n  \"client_run_s\": %.3f,\n", wall, run_s);
    /* One thread: a share near 1.0 means the generator had a whole core busy and may limit the rate. */
    printf("  \"client_cpu_share\": %.3f,\n", wall > 0 ? (user + sys) / wall : 0.0);
    if (received) printf("  \"client_cpu_us_per_delivery\": %.2f,\n", (user + sys) * 1e6 / (double)received);
    else printf("  \"client_cpu_us_per_delivery\": null,\n");
    printf("  \"errors\": [");
    const char *e = errors;
    int first = 1;
    while (*e) {
        const char *end = strchr(e, '\x1f');
        char one[1024];
        size_t len = end ? (size_t)(end - e) : strlen(e);
        if (len >= sizeof one) len = sizeof one - 1;
        memcpy(one, e, len);
        one[len] = 0;
        printf("%s", first ? "" : ", ");
        print_json_string(one);
        first = 0;
        e += len + (end ? 1 : 0);
    }
    printf("]\n}\n");
    return errors[0] ? 1 : 0;
}
