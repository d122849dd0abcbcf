/* SPDX-License-Identifier: GPL-2.0 */
/* Maps shared by every Palisade program. Each object declares the same maps
 * pinned by name, so the tc and cgroup objects share one set under the
 * agent's bpffs directory and the maps outlive the agent. */
#ifndef PAL_MAPS_H
#define PAL_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "palisade_shared.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_MAX_ENDPOINTS);
	__type(key, __u32);                 /* host-side ifindex */
	__type(value, struct pal_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_ep_ifindex SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_MAX_ENDPOINTS);
	__type(key, __u64);                 /* cgroup v2 id */
	__type(value, struct pal_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_ep_cgroup SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, PAL_MAX_IPCACHE);
	__type(key, struct pal_ipcache_key);
	__type(value, struct pal_ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_MAX_PEER_CLASS);
	__type(key, struct pal_peer_class_key);
	__type(value, __u32);               /* peer class */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_peer_class SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, PAL_MAX_POLICY);
	__type(key, struct pal_policy_key);
	__type(value, struct pal_policy_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_MAX_DEFAULTS);
	__type(key, struct pal_defaults_key);
	__type(value, struct pal_defaults_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_defaults SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pal_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PAL_MAX_CONNTRACK);
	/* Per-CPU LRU lists: inserts and evictions take no global lock. */
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct pal_ct_key);
	__type(value, struct pal_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PAL_COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, struct pal_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pal_event_bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_event_bucket SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, PAL_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_MAX_ENDPOINTS);
	__type(key, __u64);                 /* cgroup v2 id */
	__type(value, struct pal_mesh_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_mesh_ep SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_MAX_L7_PORTS);
	__type(key, struct pal_l7_port_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_l7_port SEC(".maps");

/* Does the workload with this identity have HTTP rules on TCP `port`? */
static __always_inline int pal_has_l7_rules(__u32 identity, __u16 port)
{
	struct pal_l7_port_key k = { .identity = identity, .port = port, .protocol = 6 /* TCP */ };
	if (bpf_map_lookup_elem(&pal_l7_port, &k))
		return 1;
	k.port = 0;
	return bpf_map_lookup_elem(&pal_l7_port, &k) != 0;
}

/* connect() rewrote the destination: socket cookie -> origin. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PAL_MAX_REDIRECTS);
	__type(key, __u64);
	__type(value, struct pal_redirect_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_redir_sock SEC(".maps");

/* The same, by the connection's addresses, for the agent's accept() and
 * for the packet programs; written by sockops before the SYN leaves. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PAL_MAX_REDIRECTS);
	__type(key, struct pal_redirect_key);
	__type(value, struct pal_redirect_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_redir_flow SEC(".maps");

/* Same-node fast path (sockops adds, sk_msg redirects; closed sockets
 * leave by themselves; the agent empties it when policy changes). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, PAL_MAX_REDIRECTS);
	__type(key, struct pal_sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_sock_fast SEC(".maps");

/* DNS redirected to the agent's proxy (see palisade_shared.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PAL_MAX_DNS_FLOWS);
	__type(key, __u64);                 /* socket cookie */
	__type(value, struct pal_redirect_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_dns_sock SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PAL_MAX_DNS_FLOWS);
	__type(key, struct pal_redirect_key);
	__type(value, struct pal_redirect_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_dns_flow SEC(".maps");

/* The proxy's UDP socket while it is open (a closed socket leaves the map
 * by itself, whoever closed it). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_dns_proxy SEC(".maps");

#endif
