#define _GNU_SOURCE
#include <malloc.h>
#include "CShim.h"
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include <errno.h>
#include <string.h>
#include <linux/bpf.h>
#include <fcntl.h>
#include <sched.h>
#include <unistd.h>
#include <linux/pkt_cls.h>

struct bpf_object *pal_object_open_file(const char *path, const char *pin_root)
{
	LIBBPF_OPTS(bpf_object_open_opts, opts, .pin_root_path = pin_root);
	struct bpf_object *obj = bpf_object__open_file(path, &opts);
	if (libbpf_get_error(obj)) {
		if (!errno)
			errno = EINVAL;
		return NULL;
	}
	return obj;
}

static void pal_tc_hook(struct bpf_tc_hook *hook, int ifindex, int direction)
{
	hook->ifindex = ifindex;
	hook->attach_point = direction == 0 ? BPF_TC_INGRESS : BPF_TC_EGRESS;
}

int pal_tc_attach(int ifindex, int direction, int prog_fd, uint32_t handle, uint32_t priority)
{
	LIBBPF_OPTS(bpf_tc_hook, hook);
	pal_tc_hook(&hook, ifindex, direction);
	int err = bpf_tc_hook_create(&hook);
	if (err && err != -EEXIST)
		return err;
	LIBBPF_OPTS(bpf_tc_opts, opts, .handle = handle, .priority = priority,
		    .prog_fd = prog_fd, .flags = BPF_TC_F_REPLACE);
	return bpf_tc_attach(&hook, &opts);
}

int pal_tc_detach(int ifindex, int direction, uint32_t handle, uint32_t priority)
{
	LIBBPF_OPTS(bpf_tc_hook, hook);
	pal_tc_hook(&hook, ifindex, direction);
	LIBBPF_OPTS(bpf_tc_opts, opts, .handle = handle, .priority = priority);
	int err = bpf_tc_detach(&hook, &opts);
	return err == -ENOENT ? 0 : err;
}

int pal_tc_query(int ifindex, int direction, uint32_t handle, uint32_t priority, uint32_t *prog_id)
{
	LIBBPF_OPTS(bpf_tc_hook, hook);
	pal_tc_hook(&hook, ifindex, direction);
	LIBBPF_OPTS(bpf_tc_opts, opts, .handle = handle, .priority = priority);
	int err = bpf_tc_query(&hook, &opts);
	if (err == -ENOENT || err == -EINVAL) {
		*prog_id = 0;
		return 0;
	}
	if (err)
		return err;
	*prog_id = opts.prog_id;
	return 0;
}

int pal_setns_net(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	int err = setns(fd, CLONE_NEWNET);
	int saved = errno;
	close(fd);
	return err ? -saved : 0;
}

struct ring_buffer *pal_ringbuf_new(int map_fd, pal_ringbuf_cb cb, void *ctx)
{
	return ring_buffer__new(map_fd, (ring_buffer_sample_fn)cb, ctx, NULL);
}

int pal_num_possible_cpus(void)
{
	return libbpf_num_possible_cpus();
}

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* libbpf's warnings go to stderr, except the kernel's complaint that the
 * clsact qdisc already exists: that is the normal case for an agent that
 * adopts an existing attachment. */
static int pal_libbpf_print(enum libbpf_print_level level, const char *fmt, va_list args)
{
	if (level == LIBBPF_DEBUG)
		return 0;
	char buf[1024];
	vsnprintf(buf, sizeof(buf), fmt, args);
	if (strstr(buf, "Exclusivity flag on"))
		return 0;
	return fprintf(stderr, "libbpf: %s", buf);
}

void pal_libbpf_quiet(void)
{
	libbpf_set_print(pal_libbpf_print);
}

int pal_prog_test_run_skb(int prog_fd, const void *data, uint32_t size, uint32_t mark, uint32_t *retval)
{
	struct __sk_buff ctx;
	memset(&ctx, 0, sizeof(ctx));
	ctx.mark = mark;
	LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = data, .data_size_in = size,
		    .ctx_in = &ctx, .ctx_size_in = sizeof(ctx), .repeat = 1);
	int err = bpf_prog_test_run_opts(prog_fd, &opts);
	if (err)
		return err < 0 ? err : -errno;
	*retval = opts.retval;
	return 0;
}

int pal_malloc_trim(void)
{
	return malloc_trim(0);
}
