/* New-TCP-connections-per-second load for Palisade's benchmarks.
 *   connrate server PORT                      accept, read the byte, reply, close
 *   connrate client ADDR PORT SECONDS THREADS [SOURCE]
 *                                             connect (from SOURCE if given), send a byte, read the reply, close; prints conn/s
 * A connection counts only if its round trip completed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in target, source;
static int bind_source;
static atomic_long done, failed;
static double deadline;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static void *client(void *arg) {
	(void)arg;
	char b = 'x';
	while (now() < deadline) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		struct linger l = { 1, 0 };  /* RST on close: no TIME_WAIT exhaustion */
		setsockopt(s, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
		struct timeval tv = { 1, 0 };
		setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
		if (bind_source && bind(s, (struct sockaddr *)&source, sizeof(source)) != 0) {
			atomic_fetch_add(&failed, 1);
			close(s);
			continue;
		}
		if (connect(s, (struct sockaddr *)&target, sizeof(target)) == 0 && write(s, &b, 1) == 1 && read(s, &b, 1) == 1)
			atomic_fetch_add(&done, 1);
		else
			atomic_fetch_add(&failed, 1);
		close(s);
	}
	return NULL;
}

int main(int argc, char **argv) {
	if (argc == 3 && !strcmp(argv[1], "server")) {
		int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
		setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
		if (bind(ls, (struct sockaddr *)&a, sizeof(a)) || listen(ls, 4096)) { perror("listen"); return 1; }
		for (;;) {
			int c = accept(ls, NULL, NULL);
			if (c < 0) continue;
			char b;
			if (read(c, &b, 1) == 1) (void)!write(c, &b, 1);
			close(c);
		}
	}
	if ((argc == 6 || argc == 7) && !strcmp(argv[1], "client")) {
		if (argc == 7) {
			source.sin_family = AF_INET;
			bind_source = inet_pton(AF_INET, argv[6], &source.sin_addr) == 1;
		}
		target.sin_family = AF_INET;
		target.sin_port = htons(atoi(argv[3]));
		inet_pton(AF_INET, argv[2], &target.sin_addr);
		double secs = atof(argv[4]);
		int n = atoi(argv[5]);
		pthread_t t[64];
		double start = now();
		deadline = start + secs;
		for (int i = 0; i < n && i < 64; i++) pthread_create(&t[i], NULL, client, NULL);
		for (int i = 0; i < n && i < 64; i++) pthread_join(t[i], NULL);
		printf("%.0f %ld\n", atomic_load(&done) / (now() - start), atomic_load(&failed));
		return 0;
	}
	fprintf(stderr, "usage: connrate server PORT | connrate client ADDR PORT SECONDS THREADS [SOURCE]\n");
	return 2;
}
