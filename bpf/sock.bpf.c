/* SPDX-License-Identifier: GPL-2.0 */
/* Socket redirection for enrolled workloads (attached to each workload's
 * cgroup). DNS: see pal_dns. TCP: connect() to a workload on another node is judged against the
 * egress policy at once (a denied connect fails with EPERM, no packet is
 * sent) and, when allowed, rewritten to the agent's outbound listener; the
 * original destination is remembered by socket cookie. sockops then files
 * it under the connection's addresses before the SYN leaves, which is what
 * the agent looks up on accept() and what the packet programs recognise. */
#include <linux/bpf.h>
#define PAL_SOCK_STREAM 1  /* sys/socket.h drags in glibc headers */
#include "lib/enforce.h"
#include "lib/cgroup.h"


/* sock_ops holds remote_port in network order in its upper 16 bits. */
#define pal_sockops_remote_port(skops) ((__u16)((skops)->remote_port >> 16))
/* Context fields must be read 4 bytes at a time; a volatile read keeps the
 * compiler from merging two of them into one 8-byte load the verifier
 * refuses. */
#define PAL_CTX_U32(field) (*(volatile __u32 *)&(field))

static __always_inline void pal_ctx_ip6(__u8 out[16], __u32 a0, __u32 a1, __u32 a2, __u32 a3)
{
	__u32 a[4] = { a0, a1, a2, a3 };
	__builtin_memcpy(out, a, 16);
}

static __always_inline void pal_sockops_addrs(struct bpf_sock_ops *skops, __u8 local[16], __u8 remote[16])
{
	if (skops->family == 2 /* AF_INET */) {
		pal_v4_mapped(local, skops->local_ip4);
		pal_v4_mapped(remote, skops->remote_ip4);
	} else {
		pal_ctx_ip6(local, PAL_CTX_U32(skops->local_ip6[0]), PAL_CTX_U32(skops->local_ip6[1]),
			    PAL_CTX_U32(skops->local_ip6[2]), PAL_CTX_U32(skops->local_ip6[3]));
		pal_ctx_ip6(remote, PAL_CTX_U32(skops->remote_ip6[0]), PAL_CTX_U32(skops->remote_ip6[1]),
			    PAL_CTX_U32(skops->remote_ip6[2]), PAL_CTX_U32(skops->remote_ip6[3]));
	}
}

/* The deepest enrolled cgroup containing the caller. */
static __always_inline struct pal_mesh_endpoint *pal_mesh_caller(__u64 *cgroup_id)
{
	return PAL_DEEPEST_ENROLLED(pal_mesh_ep, bpf_get_current_cgroup_id(), bpf_get_current_ancestor_cgroup_id, cgroup_id);
}

/* Points the socket at the agent (its address as the workload reaches it,
 * in the socket's family) and `port`. */
static __always_inline void pal_point_at_agent(struct bpf_sock_addr *ctx, const struct pal_mesh_endpoint *ep,
					       __u8 family, int v6_socket, __u16 port)
{
	if (!v6_socket) {
		ctx->user_ip4 = ep->agent_addr4;
	} else if (family == 4) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = ep->agent_addr4;
	} else {
		__u32 a[4];
		__builtin_memcpy(a, ep->agent_addr6, 16);
		ctx->user_ip6[0] = a[0];
		ctx->user_ip6[1] = a[1];
		ctx->user_ip6[2] = a[2];
		ctx->user_ip6[3] = a[3];
	}
	ctx->user_port = port;
}

/* Is the agent's DNS proxy there? Its socket leaves pal_dns_proxy when it
 * closes, so a stopped or killed agent is seen at once. */
static __always_inline int pal_dns_proxy_up(void)
{
	__u32 k = PAL_DNS_PROXY_UDP;
	struct bpf_sock *sk = bpf_map_lookup_elem(&pal_dns_proxy, &k);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* DNS of an enrolled workload (UDP sendmsg/connect, TCP connect to port
 * 53): judged against the egress policy towards the resolver it addressed,
 * then sent to the agent's DNS proxy when it is up, straight on when not.
 * Returns 1 to let the call proceed, 0 to refuse it (EPERM). */
static __always_inline int pal_dns(struct bpf_sock_addr *ctx, const __u8 daddr[16], __u8 family, int v6_socket,
				   __u8 proto, struct pal_mesh_endpoint *ep, __u64 cgid, struct pal_config *cfg)
{
	__u8 slot = cfg->active_slot & 1;
	__u16 dport = (__u16)ctx->user_port;
	struct pal_decision d = { .pass = 1 };
	pal_policy_decide(slot, PAL_DIR_EGRESS, ep->identity, pal_ipcache_lookup(slot, daddr), proto, dport, 0, &d);
	if (!d.pass) {
		struct pal_flow f = { .protocol = proto, .family = family, .dport = dport };
		__builtin_memcpy(f.daddr, daddr, 16);
		pal_count(PAL_DIR_EGRESS, d.reason, 0);
		pal_emit_event(&f, PAL_DIR_EGRESS, &d, ep->identity, 0, cgid, bpf_ktime_get_coarse_ns());
		return 0;
	}
	if (!pal_dns_proxy_up())
		return 1;   /* the agent is away: the resolver answers directly */
	struct pal_redirect_origin o = {
		.port = dport,
		.family = family,
		.identity = ep->identity,
		.peer_identity = d.peer_identity,
		.rule_id = d.rule_id,
		.cgroup_id = cgid,
	};
	__builtin_memcpy(o.addr, daddr, 16);
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(proto == IPPROTO_UDP ? (void *)&pal_dns_sock : (void *)&pal_redir_sock, &cookie, &o, BPF_ANY) < 0)
		return 1;   /* cannot remember the resolver: let it through to be judged as a flow */
	pal_point_at_agent(ctx, ep, family, v6_socket, cfg->dns_port);
	return 1;
}

/* sendmsg() and connect() of a UDP socket. */
static __always_inline int pal_udp(struct bpf_sock_addr *ctx, const __u8 daddr[16], __u8 family, int v6_socket)
{
	if ((__u16)ctx->user_port != bpf_htons(PAL_DNS_PORT))
		return 1;
	__u32 zero = 0;
	struct pal_config *cfg = bpf_map_lookup_elem(&pal_config, &zero);
	if (!cfg || !cfg->dns_port)
		return 1;
	__u64 cgid = 0;
	struct pal_mesh_endpoint *ep = pal_mesh_caller(&cgid);
	if (!ep)
		return 1;
	return pal_dns(ctx, daddr, family, v6_socket, IPPROTO_UDP, ep, cgid, cfg);
}

/* Returns 1 to let connect() proceed (rewritten or not), 0 to refuse it. */
static __always_inline int pal_connect(struct bpf_sock_addr *ctx, const __u8 daddr[16], __u8 family, int v6_socket)
{
	if (ctx->type != PAL_SOCK_STREAM)
		return ctx->protocol == IPPROTO_UDP ? pal_udp(ctx, daddr, family, v6_socket) : 1;
	__u64 cgid = 0;
	struct pal_mesh_endpoint *ep = pal_mesh_caller(&cgid);
	if (!ep)
		return 1;
	__u32 zero = 0;
	struct pal_config *cfg = bpf_map_lookup_elem(&pal_config, &zero);
	__u8 slot = cfg ? (cfg->active_slot & 1) : 0;
	__u16 dport = (__u16)ctx->user_port;
	if (cfg && cfg->dns_port && dport == bpf_htons(PAL_DNS_PORT))
		return pal_dns(ctx, daddr, family, v6_socket, IPPROTO_TCP, ep, cgid, cfg);
	struct pal_ipcache_value peer = pal_ipcache_lookup(slot, daddr);
	/* Remote workloads go through the tunnel; this node's workloads only
	 * when the port has HTTP rules (the agent's proxy judges requests). */
	if (!(peer.flags & PAL_IPCACHE_REMOTE_WORKLOAD) && !(peer.identity && pal_has_l7_rules(peer.identity, dport)))
		return 1;   /* not a mesh destination: the packet programs judge it */

	struct pal_decision d = { .pass = 1 };
	pal_policy_decide(slot, PAL_DIR_EGRESS, ep->identity, peer, IPPROTO_TCP, dport, 0, &d);
	pal_count(PAL_DIR_EGRESS, d.reason, 0);
	if (!d.pass || d.reason == PAL_REASON_AUDIT_WOULD_DENY || (cfg && (cfg->event_flags & PAL_EVENTS_ALLOWED))) {
		struct pal_flow f = { .protocol = IPPROTO_TCP, .family = family, .dport = dport };
		__builtin_memcpy(f.daddr, daddr, 16);
		pal_emit_event(&f, PAL_DIR_EGRESS, &d, ep->identity, 0, cgid, bpf_ktime_get_coarse_ns());
	}
	if (!d.pass)
		return 0;

	struct pal_redirect_origin o = {
		.port = dport,
		.family = family,
		.identity = ep->identity,
		.peer_identity = peer.identity,
		.rule_id = d.rule_id,
		.cgroup_id = cgid,
	};
	__builtin_memcpy(o.addr, daddr, 16);
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&pal_redir_sock, &cookie, &o, BPF_ANY) < 0)
		return 0;   /* cannot remember the destination: refuse rather than leak plaintext */
	pal_point_at_agent(ctx, ep, family, v6_socket, ep->agent_port);
	return 1;
}

static __always_inline void pal_ctx_daddr6(struct bpf_sock_addr *ctx, __u8 daddr[16], int *mapped)
{
	__u32 a[4] = { PAL_CTX_U32(ctx->user_ip6[0]), PAL_CTX_U32(ctx->user_ip6[1]),
		       PAL_CTX_U32(ctx->user_ip6[2]), PAL_CTX_U32(ctx->user_ip6[3]) };
	__builtin_memcpy(daddr, a, 16);
	*mapped = a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

SEC("cgroup/connect4")
int pal_connect4(struct bpf_sock_addr *ctx)
{
	__u8 daddr[16];
	pal_v4_mapped(daddr, ctx->user_ip4);
	return pal_connect(ctx, daddr, 4, 0);
}

SEC("cgroup/connect6")
int pal_connect6(struct bpf_sock_addr *ctx)
{
	__u8 daddr[16];
	int mapped;
	pal_ctx_daddr6(ctx, daddr, &mapped);
	/* An IPv4-mapped destination on an IPv6 socket is an IPv4 connection. */
	return pal_connect(ctx, daddr, mapped ? 4 : 6, 1);
}

/* An unconnected UDP socket's datagram (the connected ones went through
 * connect4/6 above). */
SEC("cgroup/sendmsg4")
int pal_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u8 daddr[16];
	pal_v4_mapped(daddr, ctx->user_ip4);
	return pal_udp(ctx, daddr, 4, 0);
}

SEC("cgroup/sendmsg6")
int pal_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u8 daddr[16];
	int mapped;
	pal_ctx_daddr6(ctx, daddr, &mapped);
	return pal_udp(ctx, daddr, mapped ? 4 : 6, 1);
}

/* The proxy's answer: the workload sees it come from the resolver it asked. */
static __always_inline int pal_recvmsg(struct bpf_sock_addr *ctx, int v6_socket)
{
	__u32 zero = 0;
	struct pal_config *cfg = bpf_map_lookup_elem(&pal_config, &zero);
	if (!cfg || !cfg->dns_port || (__u16)ctx->user_port != cfg->dns_port)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct pal_redirect_origin *o = bpf_map_lookup_elem(&pal_dns_sock, &cookie);
	if (!o)
		return 1;
	if (!v6_socket) {
		__u32 a4;
		__builtin_memcpy(&a4, o->addr + 12, 4);
		ctx->user_ip4 = a4;
	} else {
		__u32 a[4];
		__builtin_memcpy(a, o->addr, 16);
		ctx->user_ip6[0] = a[0];
		ctx->user_ip6[1] = a[1];
		ctx->user_ip6[2] = a[2];
		ctx->user_ip6[3] = a[3];
	}
	ctx->user_port = o->port;
	return 1;
}

SEC("cgroup/recvmsg4")
int pal_recvmsg4(struct bpf_sock_addr *ctx)
{
	return pal_recvmsg(ctx, 0);
}

SEC("cgroup/recvmsg6")
int pal_recvmsg6(struct bpf_sock_addr *ctx)
{
	return pal_recvmsg(ctx, 1);
}

/* On the way out of the workload: file a DNS datagram the hooks sent to the
 * proxy under its addresses, which is what the proxy sees. */
SEC("cgroup_skb/egress")
int pal_dns_file(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct pal_config *cfg = bpf_map_lookup_elem(&pal_config, &zero);
	if (!cfg || !cfg->dns_port)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct pal_redirect_origin *o = bpf_map_lookup_elem(&pal_dns_sock, &cookie);
	if (!o)
		return 1;
	struct pal_flow f = {};
	if (pal_parse(skb, 0, &f) != PAL_PARSE_OK || f.protocol != IPPROTO_UDP || f.dport != cfg->dns_port)
		return 1;
	struct pal_redirect_key k = pal_redirect_key_of(&f);
	bpf_map_update_elem(&pal_dns_flow, &k, o, BPF_ANY);
	return 1;
}

/* Before the SYN leaves (local port chosen): file the origin under the
 * connection's addresses. */
static __always_inline void pal_sockops_redirect(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct pal_redirect_origin *o = bpf_map_lookup_elem(&pal_redir_sock, &cookie);
	if (!o)
		return;
	struct pal_redirect_key k = {};
	pal_sockops_addrs(skops, k.client_addr, k.agent_addr);
	k.client_port = bpf_htons((__u16)skops->local_port);
	k.agent_port = pal_sockops_remote_port(skops);
	bpf_map_update_elem(&pal_redir_flow, &k, o, BPF_ANY);
	bpf_map_delete_elem(&pal_redir_sock, &cookie);
}

/* An established connection between two workloads of this node (the
 * packet programs admitted its handshake): into the fast path. */
static __always_inline void pal_sockops_fast(struct bpf_sock_ops *skops)
{
	struct pal_sock_key k = {};
	pal_sockops_addrs(skops, k.local_addr, k.remote_addr);
	__u32 zero = 0;
	struct pal_config *cfg = bpf_map_lookup_elem(&pal_config, &zero);
	__u8 slot = cfg ? (cfg->active_slot & 1) : 0;
	if (!pal_is_local_workload(pal_ipcache_lookup(slot, k.local_addr)) ||
	    !pal_is_local_workload(pal_ipcache_lookup(slot, k.remote_addr)))
		return;
	k.local_port = bpf_htons((__u16)skops->local_port);
	k.remote_port = pal_sockops_remote_port(skops);
	bpf_sock_hash_update(skops, &pal_sock_fast, &k, BPF_NOEXIST);
}

SEC("sockops")
int pal_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		pal_sockops_redirect(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		pal_sockops_fast(skops);
		break;
	}
	return 1;
}

/* Data a fast-path socket sends goes straight to its peer's receive queue. */
SEC("sk_msg")
int pal_sk_msg(struct sk_msg_md *msg)
{
	struct pal_sock_key peer = {};
	if (msg->family == 2 /* AF_INET */) {
		pal_v4_mapped(peer.local_addr, msg->remote_ip4);
		pal_v4_mapped(peer.remote_addr, msg->local_ip4);
	} else {
		pal_ctx_ip6(peer.local_addr, PAL_CTX_U32(msg->remote_ip6[0]), PAL_CTX_U32(msg->remote_ip6[1]),
			    PAL_CTX_U32(msg->remote_ip6[2]), PAL_CTX_U32(msg->remote_ip6[3]));
		pal_ctx_ip6(peer.remote_addr, PAL_CTX_U32(msg->local_ip6[0]), PAL_CTX_U32(msg->local_ip6[1]),
			    PAL_CTX_U32(msg->local_ip6[2]), PAL_CTX_U32(msg->local_ip6[3]));
	}
	peer.local_port = (__u16)(msg->remote_port >> 16);
	peer.remote_port = bpf_htons((__u16)msg->local_port);
	bpf_msg_redirect_hash(msg, &pal_sock_fast, &peer, BPF_F_INGRESS);
	return SK_PASS;   /* no peer in the map: the normal path */
}

char LICENSE[] SEC("license") = "GPL";
