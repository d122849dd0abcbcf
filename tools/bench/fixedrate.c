// Open-loop HTTP/1.1 load at a fixed rate, with microsecond latencies.
//
//   fixedrate HOST PORT RATE SECONDS CONNECTIONS [PATH]
//
// Request i is due at start + i/RATE on connection i % CONNECTIONS
// (keep-alive, one request in flight per connection). A request that cannot
// go when it is due (its connection still waits for an answer) waits in
// that connection's queue, and its latency still counts from when it was
// due: a stall shows up in the percentiles instead of slowing the load down
// (no coordinated omission, unlike a closed-loop tool such as wrk or hey).
//
// Prints one line: "rate=R sent=N ok=N errors=N p50=US p90=US p99=US p999=US max=US"
// (latencies in microseconds, from due time to the last byte of the answer).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define QUEUE 4096

struct conn {
	int fd;
	int busy;                 // a request is on the wire
	uint64_t sent_due;        // due time of that request (ns)
	uint64_t queue[QUEUE];    // due times waiting for this connection
	unsigned head, tail;
	char buf[65536];
	size_t len;
};

static uint64_t now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u32(const void *a, const void *b) {
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

static char request[512];
static size_t request_len;

static int open_conn(const char *host, int port) {
	struct sockaddr_in6 a6 = {0};
	struct sockaddr_in a4 = {0};
	int fd;
	if (inet_pton(AF_INET, host, &a4.sin_addr) == 1) {
		a4.sin_family = AF_INET;
		a4.sin_port = htons(port);
		fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0 || connect(fd, (struct sockaddr *)&a4, sizeof a4) < 0) return -1;
	} else {
		if (inet_pton(AF_INET6, host, &a6.sin6_addr) != 1) return -1;
		a6.sin6_family = AF_INET6;
		a6.sin6_port = htons(port);
		fd = socket(AF_INET6, SOCK_STREAM, 0);
		if (fd < 0 || connect(fd, (struct sockaddr *)&a6, sizeof a6) < 0) return -1;
	}
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	return fd;
}

static int send_request(struct conn *c, uint64_t due) {
	ssize_t n = send(c->fd, request, request_len, MSG_NOSIGNAL);
	if (n != (ssize_t)request_len) return -1;   // a small request fits an empty socket buffer
	c->busy = 1;
	c->sent_due = due;
	c->len = 0;
	return 0;
}

// Bytes of a complete answer at the start of buf, 0 if not complete yet,
// -1 if it is not an answer this tool understands.
static long complete_answer(const char *buf, size_t len) {
	const char *end = memmem(buf, len, "\r\n\r\n", 4);
	if (!end) return len > 16384 ? -1 : 0;
	size_t head = (size_t)(end - buf) + 4;
	long body = -1;
	for (const char *p = buf; p < end; ) {
		const char *eol = memmem(p, (size_t)(end - p) + 2, "\r\n", 2);
		if (!eol) break;
		if ((size_t)(eol - p) > 15 && strncasecmp(p, "content-length:", 15) == 0) body = strtol(p + 15, NULL, 10);
		p = eol + 2;
	}
	if (body < 0) return -1;   // the benchmark's servers always send Content-Length
	return len >= head + (size_t)body ? (long)(head + (size_t)body) : 0;
}

int main(int argc, char **argv) {
	if (argc < 6) {
		fprintf(stderr, "usage: %s HOST PORT RATE SECONDS CONNECTIONS [PATH]\n", argv[0]);
		return 2;
	}
	const char *host = argv[1];
	int port = atoi(argv[2]);
	double rate = atof(argv[3]), seconds = atof(argv[4]);
	int nconn = atoi(argv[5]);
	const char *path = argc > 6 ? argv[6] : "/";
	if (rate <= 0 || seconds <= 0 || nconn <= 0) return 2;
	request_len = (size_t)snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: fixedrate\r\n\r\n", path, host);

	uint64_t total = (uint64_t)(rate * seconds);
	uint32_t *lat = calloc(total + 1, sizeof *lat);
	struct conn *conns = calloc((size_t)nconn, sizeof *conns);
	int ep = epoll_create1(0);
	if (!lat || !conns || ep < 0) return 1;
	for (int i = 0; i < nconn; i++) {
		conns[i].fd = open_conn(host, port);
		if (conns[i].fd < 0) { perror("connect"); return 1; }
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
		epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
	}

	uint64_t interval = (uint64_t)(1e9 / rate);
	uint64_t start = now_ns() + 1000000;   // 1 ms to settle
	uint64_t next = 0, ok = 0, errors = 0, max = 0;
	uint64_t deadline = start + (uint64_t)(seconds * 1e9) + 5000000000ull;   // answers have 5 s more
	struct epoll_event events[256];
	while (ok + errors < total) {
		uint64_t t = now_ns();
		if (t > deadline) break;
		// Every request now due goes out, or waits for its connection.
		while (next < total && start + next * interval <= t) {
			struct conn *c = &conns[next % (uint64_t)nconn];
			uint64_t due = start + next * interval;
			if (!c->busy) {
				if (send_request(c, due) < 0) errors++;
			} else if (c->tail - c->head < QUEUE) {
				c->queue[c->tail++ % QUEUE] = due;
			} else {
				errors++;
			}
			next++;
		}
		// Sleep until the next request is due (epoll_pwait2: a nanosecond
		// timeout, so the generator neither spins nor oversleeps by a tick).
		uint64_t wait_ns = 1000000;
		if (next < total) {
			uint64_t due = start + next * interval;
			t = now_ns();
			wait_ns = due > t ? due - t : 0;
		}
		struct timespec timeout = {.tv_sec = (time_t)(wait_ns / 1000000000ull), .tv_nsec = (long)(wait_ns % 1000000000ull)};
		int n = epoll_pwait2(ep, events, 256, &timeout, NULL);
		for (int k = 0; k < n; k++) {
			struct conn *c = &conns[events[k].data.u32];
			for (;;) {
				ssize_t r = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
				if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
					fprintf(stderr, "connection %u closed\n", events[k].data.u32);
					return 1;
				}
				if (r < 0) break;
				c->len += (size_t)r;
				long done;
				while (c->busy && (done = complete_answer(c->buf, c->len)) != 0) {
					if (done < 0) { fprintf(stderr, "unexpected answer\n"); return 1; }
					uint64_t us = (now_ns() - c->sent_due) / 1000;
					if (us > max) max = us;
					if (strncmp(c->buf, "HTTP/1.1 200", 12) == 0) lat[ok++] = (uint32_t)(us > UINT32_MAX ? UINT32_MAX : us);
					else errors++;
					memmove(c->buf, c->buf + done, c->len - (size_t)done);
					c->len -= (size_t)done;
					c->busy = 0;
					if (c->head != c->tail) {
						uint64_t due = c->queue[c->head++ % QUEUE];
						if (send_request(c, due) < 0) errors++;
					}
				}
			}
		}
	}
	double elapsed = (double)(now_ns() - start) / 1e9;
	qsort(lat, ok, sizeof *lat, cmp_u32);
#define PCT(p) (ok ? lat[(uint64_t)((double)(ok - 1) * (p))] : 0)
	printf("rate=%.0f sent=%llu ok=%llu errors=%llu p50=%u p90=%u p99=%u p999=%u max=%llu\n",
	       (double)ok / (elapsed < seconds ? elapsed : seconds), (unsigned long long)next, (unsigned long long)ok,
	       (unsigned long long)(errors + (total - ok - errors)), PCT(0.50), PCT(0.90), PCT(0.99), PCT(0.999),
	       (unsigned long long)max);
	return 0;
}
