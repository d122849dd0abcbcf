/* DNS round trips one after another on a connected UDP socket (as glibc's
 * resolver does), each timed with the monotonic clock; prints
 * "p50 p90 p99 mean count failed" in microseconds.
 *   dnslat SERVER PORT NAME COUNT          the same name every time
 *   dnslat SERVER PORT PATTERN COUNT seq   PATTERN with %d = 0..COUNT-1 */
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int query(unsigned char *out, uint16_t id, const char *name)
{
	int n = 0;
	out[n++] = id >> 8; out[n++] = id & 0xff;
	out[n++] = 0x01; out[n++] = 0x00;   /* RD */
	out[n++] = 0; out[n++] = 1; memset(out + n, 0, 6); n += 6;
	const char *p = name;
	while (*p) {
		const char *dot = strchr(p, '.');
		int len = dot ? (int)(dot - p) : (int)strlen(p);
		out[n++] = (unsigned char)len;
		memcpy(out + n, p, len); n += len;
		p += len + (dot ? 1 : 0);
	}
	out[n++] = 0;
	out[n++] = 0; out[n++] = 1;   /* A */
	out[n++] = 0; out[n++] = 1;   /* IN */
	return n;
}

static int cmp(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	if (argc < 5) { fprintf(stderr, "usage: dnslat SERVER PORT NAME COUNT [seq]\n"); return 2; }
	int count = atoi(argv[4]), seq = argc > 5 && !strcmp(argv[5], "seq");
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2])) };
	if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) { fprintf(stderr, "bad address\n"); return 2; }
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	struct timeval tv = { .tv_sec = 2 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("connect"); return 1; }
	uint64_t *lat = calloc(count, sizeof *lat);
	int ok = 0, failed = 0;
	unsigned char q[512], a[4096];
	char name[256];
	for (int i = 0; i < count; i++) {
		if (seq) snprintf(name, sizeof name, argv[3], i); else snprintf(name, sizeof name, "%s", argv[3]);
		uint16_t id = (uint16_t)(i * 7919 + 1);
		int n = query(q, id, name);
		uint64_t t0 = now_ns();
		if (send(fd, q, n, 0) != n) { failed++; continue; }
		for (;;) {
			ssize_t r = recv(fd, a, sizeof a, 0);
			if (r < 0) { failed++; break; }
			if (r >= 12 && a[0] == (id >> 8) && a[1] == (id & 0xff)) { lat[ok++] = (now_ns() - t0) / 1000; break; }
		}
	}
	if (!ok) { printf("0 0 0 0 0 %d\n", failed); return 1; }
	qsort(lat, ok, sizeof *lat, cmp);
	uint64_t sum = 0;
	for (int i = 0; i < ok; i++) sum += lat[i];
	printf("%llu %llu %llu %llu %d %d\n", (unsigned long long)lat[ok / 2], (unsigned long long)lat[ok * 90 / 100],
	       (unsigned long long)lat[ok * 99 / 100], (unsigned long long)(sum / ok), ok, failed);
	return 0;
}
