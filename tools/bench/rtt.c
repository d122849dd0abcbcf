/* Round-trip latency of 1-byte TCP ping-pongs on one connection.
 *   rtt server PORT               echo one byte at a time, forever
 *   rtt client ADDR PORT COUNT    prints "p50_us p99_us" of COUNT round trips
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void *echo(void *arg) {
	int c = (int)(long)arg;
	char b[64];
	ssize_t n;
	while ((n = recv(c, b, sizeof b, 0)) > 0)
		if (send(c, b, n, 0) != n) break;
	close(c);
	return NULL;
}

static int cmp(const void *a, const void *b) {
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
	int one = 1;
	if (argc == 3 && !strcmp(argv[1], "server")) {
		int s = socket(AF_INET6, SOCK_STREAM, 0);
		int zero = 0;
		setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_port = htons(atoi(argv[2])), .sin6_addr = in6addr_any };
		if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 128)) { perror("listen"); return 1; }
		for (;;) {
			int c = accept(s, NULL, NULL);
			if (c < 0) continue;
			setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
			pthread_t t;
			pthread_create(&t, NULL, echo, (void *)(long)c);
			pthread_detach(t);
		}
	}
	if (argc != 5 || strcmp(argv[1], "client")) {
		fprintf(stderr, "usage: rtt server PORT | rtt client ADDR PORT COUNT\n");
		return 2;
	}
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *ai;
	if (getaddrinfo(argv[2], argv[3], &hints, &ai)) { fprintf(stderr, "bad address\n"); return 1; }
	int s = socket(ai->ai_family, SOCK_STREAM, 0);
	if (connect(s, ai->ai_addr, ai->ai_addrlen)) { perror("connect"); return 1; }
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	int count = atoi(argv[4]);
	double *us = malloc(sizeof(double) * count);
	char b = 'x';
	for (int i = 0; i < count + 100; i++) {
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		if (send(s, &b, 1, 0) != 1 || recv(s, &b, 1, 0) != 1) { perror("ping"); return 1; }
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if (i >= 100) /* warm-up excluded */
			us[i - 100] = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
	}
	qsort(us, count, sizeof(double), cmp);
	printf("%.1f %.1f\n", us[count / 2], us[(int)(count * 0.99)]);
	return 0;
}
