// nfq_delay: userspace stand-in for `tc netem delay D loss P` on kernels without sch_netem.
// Packets that an nft rule sends to NFQUEUE QNUM are held for DELAY_US microseconds, then accepted
// (one batch verdict for every packet that is due); a fraction LOSS of them is dropped on arrival.
// Constant delay keeps FIFO order, so "all ids <= X" batch verdicts are exact.
// Bounded: exits after MAX_SECONDS. With `queue ... bypass` in the nft rule, packets pass unharmed
// once this program is gone.
// build: gcc -O2 -o nfq_delay nfq_delay.c -lnetfilter_queue (bench/_wan.py builds it into a cache dir,
// never into the repository). From ../shared/netem of the project's workspace, unchanged otherwise.
// usage: nfq_delay QNUM DELAY_US LOSS_FRACTION MAX_SECONDS
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RING (1u << 20)
static uint32_t ring_id[RING];
static uint64_t ring_t[RING];
static uint32_t head, tail;             // tail - head = packets held
static uint64_t delay_ns;
static uint32_t loss_threshold;         // drop if rand32 < threshold
static uint64_t n_in, n_drop, n_overflow, max_held;
static struct nfq_q_handle *qh;
static volatile sig_atomic_t stop;
static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}
static uint32_t rand32(void) {          // xorshift64*
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return (uint32_t)((rng * 2685821657736338717ull) >> 32);
}

static int cb(struct nfq_q_handle *q, struct nfgenmsg *m, struct nfq_data *nfa, void *d) {
    (void)m; (void)d;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    if (!ph) return 0;
    uint32_t id = ntohl(ph->packet_id);
    n_in++;
    if (loss_threshold && rand32() < loss_threshold) {
        n_drop++;
        return nfq_set_verdict(q, id, NF_DROP, 0, NULL);
    }
    if (tail - head >= RING) {          // should not happen (queue maxlen < RING); never stall
        n_overflow++;
        return nfq_set_verdict(q, id, NF_ACCEPT, 0, NULL);
    }
    ring_id[tail % RING] = id;
    ring_t[tail % RING] = now_ns() + delay_ns;
    tail++;
    if (tail - head > max_held) max_held = tail - head;
    return 0;
}

static void release_due(uint64_t t) {
    uint32_t last = 0;
    int any = 0;
    while (head != tail && ring_t[head % RING] <= t) {
        last = ring_id[head % RING];
        head++;
        any = 1;
    }
    // accept every queued packet with id <= last (dropped ones already have their verdict)
    if (any) nfq_set_verdict_batch(qh, last, NF_ACCEPT);
}

static void on_sig(int s) { (void)s; stop = 1; }

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s QNUM DELAY_US LOSS_FRACTION MAX_SECONDS\n", argv[0]);
        return 2;
    }
    int qnum = atoi(argv[1]);
    delay_ns = (uint64_t)atoll(argv[2]) * 1000ull;
    double loss = atof(argv[3]);
    double max_s = atof(argv[4]);
    loss_threshold = (uint32_t)(loss * 4294967295.0);
    rng ^= (uint64_t)getpid() << 17 ^ now_ns();
    signal(SIGTERM, on_sig);
    signal(SIGINT, on_sig);

    struct nfq_handle *h = nfq_open();
    if (!h) { perror("nfq_open"); return 1; }
    qh = nfq_create_queue(h, qnum, &cb, NULL);
    if (!qh) { perror("nfq_create_queue"); return 1; }
    if (nfq_set_mode(qh, NFQNL_COPY_META, 0) < 0) { perror("nfq_set_mode"); return 1; }
    nfq_set_queue_maxlen(qh, 200000);
    nfq_set_queue_flags(qh, NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_FAIL_OPEN);
    int fd = nfq_fd(h);
    int one = 1, rcv = 64 << 20;
    setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv);
    fprintf(stderr, "nfq_delay: queue %d, delay %.1f ms, loss %.4f, max %.0f s\n",
            qnum, delay_ns / 1e6, loss, max_s);

    static char buf[1 << 16] __attribute__((aligned));
    uint64_t t_end = now_ns() + (uint64_t)(max_s * 1e9);
    while (!stop) {
        uint64_t t = now_ns();
        if (t >= t_end) break;
        release_due(t);
        uint64_t dt = 5000000ull;              // idle: wake every 5 ms to check the deadline
        if (head != tail) dt = ring_t[head % RING] > t ? ring_t[head % RING] - t : 0;
        struct timespec to = {.tv_sec = (time_t)(dt / 1000000000ull), .tv_nsec = (long)(dt % 1000000000ull)};
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = ppoll(&p, 1, &to, NULL);       // ns timeout: no busy-wait until the next release
        if (r > 0) {
            for (int k = 0; k < 256; k++) {
                ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
                if (n <= 0) break;
                nfq_handle_packet(h, buf, (int)n);
            }
        }
    }
    release_due(UINT64_MAX);               // let everything still held go
    fprintf(stderr, "nfq_delay: %llu packets, %llu dropped, %llu overflow, max held %llu\n",
            (unsigned long long)n_in, (unsigned long long)n_drop, (unsigned long long)n_overflow,
            (unsigned long long)max_held);
    nfq_destroy_queue(qh);
    nfq_close(h);
    return 0;
}
