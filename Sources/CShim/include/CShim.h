/* The few libbpf and libc calls Swift cannot express directly: options
 * structs (LIBBPF_OPTS zeroes padding, Swift's T() does not), setns and
 * CLONE_NEWNET and malloc_trim (hidden from Swift's Glibc module). */
#ifndef PALISADE_CSHIM_H
#define PALISADE_CSHIM_H

#include <stdint.h>
#include <stddef.h>

struct bpf_object;
struct bpf_program;
struct ring_buffer;

/* Open an object from memory or a path, pinning maps by name under pin_root. */
struct bpf_object *pal_object_open_file(const char *path, const char *pin_root);

/* tc clsact: create the qdisc if needed and attach prog_fd at (handle, priority),
 * replacing whatever is there (atomic program swap). direction: 0 ingress, 1 egress. */
int pal_tc_attach(int ifindex, int direction, int prog_fd, uint32_t handle, uint32_t priority);
/* Detach the filter at (handle, priority); ENOENT is not an error. */
int pal_tc_detach(int ifindex, int direction, uint32_t handle, uint32_t priority);
/* Program id attached at (handle, priority), 0 if none, <0 on error. */
int pal_tc_query(int ifindex, int direction, uint32_t handle, uint32_t priority, uint32_t *prog_id);

/* glibc's malloc_trim(0) (malloc.h is not in Swift's Glibc module):
 * returns free heap pages of every arena to the kernel. */
int pal_malloc_trim(void);

/* Enter the network namespace at path on the calling thread. */
int pal_setns_net(const char *path);

/* Ring buffer over a map fd, calling back (ctx, data, size). */
typedef int (*pal_ringbuf_cb)(void *ctx, void *data, size_t size);
struct ring_buffer *pal_ringbuf_new(int map_fd, pal_ringbuf_cb cb, void *ctx);

/* Route libbpf messages, dropping expected noise. */
void pal_libbpf_quiet(void);

/* Runs a socket-buffer program (tc, cgroup_skb) once on a crafted packet
 * (BPF_PROG_TEST_RUN) with skb->mark set; *retval is its return value.
 * 0 or -errno. */
int pal_prog_test_run_skb(int prog_fd, const void *data, uint32_t size, uint32_t mark, uint32_t *retval);

/* Number of possible CPUs, for per-CPU value arrays. */
int pal_num_possible_cpus(void);

#endif
