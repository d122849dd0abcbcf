/* SPDX-License-Identifier: GPL-2.0 */
/* The verdict for one packet at one endpoint: conntrack first, then the
 * peer's identity (identity.h), then the policy of the active generation
 * (policy.h); verdicts are counted (verdict.h) and reported (events.h). */
#ifndef PAL_ENFORCE_H
#define PAL_ENFORCE_H

#include "maps.h"
#include "parse.h"
#include "verdict.h"
#include "identity.h"
#include "events.h"
#include "policy.h"
#include "conntrack.h"

/* A packet's addresses as the redirect maps key them (client = sender). */
static __always_inline struct pal_redirect_key pal_redirect_key_of(const struct pal_flow *f)
{
	struct pal_redirect_key k = { .client_port = f->sport, .agent_port = f->dport };
	__builtin_memcpy(k.client_addr, f->saddr, 16);
	__builtin_memcpy(k.agent_addr, f->daddr, 16);
	return k;
}

/* The origin of an outgoing packet the socket hooks sent to the agent
 * (judged there against its original destination), or 0. TCP: a
 * connection the connect hook redirected (sockops filed it). UDP: a DNS
 * datagram for the agent's proxy; the filing program may run after this
 * one on the same cgroup, so the socket's cookie says it too. Only the
 * hooks write these maps: a workload cannot fake an entry. */
static __always_inline struct pal_redirect_origin *
pal_redirected(struct __sk_buff *skb, const struct pal_flow *f, const struct pal_config *cfg)
{
	if (f->fragment || (f->protocol != IPPROTO_TCP && f->protocol != IPPROTO_UDP))
		return 0;
	struct pal_redirect_key rk = pal_redirect_key_of(f);
	if (f->protocol == IPPROTO_TCP)
		return bpf_map_lookup_elem(&pal_redir_flow, &rk);
	struct pal_redirect_origin *o = bpf_map_lookup_elem(&pal_dns_flow, &rk);
	if (o || !cfg || !cfg->dns_port || cfg->dns_port != f->dport)
		return o;
	__u64 cookie = bpf_get_socket_cookie(skb);
	return cookie ? bpf_map_lookup_elem(&pal_dns_sock, &cookie) : 0;
}

/* Returns 1 to pass, 0 to drop. */
static __always_inline int pal_enforce(struct __sk_buff *skb, const struct pal_endpoint *ep,
				       __u8 dir, struct pal_flow *f, __u32 ifindex, __u64 cgroup_id)
{
	__u32 len = skb->len;
	/* Coarse clock: a tick-resolution read without touching the TSC; flow
	 * timestamps and the event bucket need no better. */
	__u64 now = bpf_ktime_get_coarse_ns();
	struct pal_decision d = { .pass = 1, .reason = PAL_REASON_ALLOW_POLICY, .peer_identity = 0, .rule_id = 0 };
	__u32 local_id = ep->identity;

	if (f->always_allow) {
		pal_count(dir, PAL_REASON_ALLOW_UNENFORCED, len);
		return 1;
	}

	/* Conntrack: one lookup finds the flow whichever end sent this packet. */
	struct pal_ct_key ck = {};
	__u8 swapped = 0;
	pal_ct_key_for(&ck, f, ep->endpoint_id, &swapped);
	struct pal_ct_value *ct = f->fragment ? 0 : bpf_map_lookup_elem(&pal_conntrack, &ck);
	if (ct && (ct->flags & PAL_CT_REVOKED)) {
		/* SYN without ACK: a new connection, judged below (its entry
		 * replaces the tombstone). Anything else belongs to the revoked flow. */
		if (f->protocol == IPPROTO_TCP && (f->tcp_flags & 0x12) == 0x02) {
			ct = 0;
		} else {
			d.pass = 0;
			d.reason = PAL_REASON_DENY_REVOKED;
			d.peer_identity = ct->peer_identity;
			d.rule_id = ct->rule_id;
			pal_count(dir, d.reason, len);
			pal_emit_event(f, dir, &d, local_id, ifindex, cgroup_id, now);
			return 0;
		}
	}
	if (ct) {
		int reply = ct->initiator_is_b != swapped;
		/* Write the shared entry only when something changes, and keep the
		 * per-flow counters plain (approximate under concurrency, as
		 * exact ones would need two locked instructions per packet). */
		if (now - ct->last_seen_ns > PAL_NS_PER_SEC)
			ct->last_seen_ns = now;
		if (reply && !(ct->flags & PAL_CT_SEEN_REPLY))
			ct->flags |= PAL_CT_SEEN_REPLY;
		ct->packets += 1;
		ct->bytes += len;
		pal_ct_track_close(ct, f, &ck);
		pal_count(dir, reply ? PAL_REASON_ALLOW_REPLY : PAL_REASON_ALLOW_ESTABLISHED, len);
		return 1;
	}

	__u32 zero = 0;
	struct pal_config *cfg = bpf_map_lookup_elem(&pal_config, &zero);
	__u8 slot = cfg ? (cfg->active_slot & 1) : 0;

	/* Anti-spoofing, on the first packet of a flow (later packets must match
	 * the flow's entry, which is scoped to this endpoint): what a pod sends
	 * must come from one of its own addresses. */
	if ((ep->flags & PAL_EP_VERIFY_SOURCE) && dir == PAL_DIR_EGRESS &&
	    pal_ipcache_lookup(slot, f->saddr).identity != local_id) {
		d.pass = 0;
		d.reason = PAL_REASON_DENY_SPOOFED;
		pal_count(dir, d.reason, len);
		pal_emit_event(f, dir, &d, local_id, ifindex, cgroup_id, now);
		return 0;
	}

	struct pal_defaults_value *def = 0;
	struct pal_redirect_origin *redirect = dir == PAL_DIR_EGRESS ? pal_redirected(skb, f, cfg) : 0;
	if (redirect) {
		d.reason = PAL_REASON_ALLOW_REDIRECT;
		d.peer_identity = redirect->peer_identity;
		d.rule_id = redirect->rule_id;
	} else if (f->fragment) {
		struct pal_defaults_key dk = { .generation = slot, .direction = dir, .local_identity = local_id };
		if (bpf_map_lookup_elem(&pal_defaults, &dk)) {
			d.pass = 0;
			d.reason = PAL_REASON_DENY_FRAGMENT;
		} else {
			d.reason = PAL_REASON_ALLOW_UNENFORCED;
		}
	} else {
		/* A new flow: who the peer is and what the active generation says.
		 * A connection the agent delivers from the tunnel carries the
		 * authenticated source identity in its mark (see PAL_MARK_MAGIC). */
		struct pal_ipcache_value peer;
		int tunnelled = dir == PAL_DIR_INGRESS && (skb->mark & PAL_MARK_MASK) == PAL_MARK_MAGIC;
		if (tunnelled) {
			peer.identity = skb->mark & PAL_MARK_IDENTITY;
			peer.cidr_identity = 0;
			peer.fqdn_class = 0;
			peer.flags = 0;
			peer.peer_class = pal_peer_class_of(slot, peer.identity);
		} else {
			peer = pal_ipcache_lookup(slot, dir == PAL_DIR_INGRESS ? f->saddr : f->daddr);
		}
		def = pal_policy_decide(slot, dir, local_id, peer, f->protocol, f->dport, len, &d);
		if (dir == PAL_DIR_INGRESS && !tunnelled && !pal_is_local_workload(peer) && d.pass) {
			if (ep->flags & PAL_EP_MTLS_STRICT) {
				d.pass = 0;
				d.reason = PAL_REASON_DENY_PLAINTEXT;
			} else if ((ep->flags & PAL_EP_MTLS_PERMISSIVE) && d.reason != PAL_REASON_AUDIT_WOULD_DENY) {
				d.reason = PAL_REASON_ALLOW_PLAINTEXT;
			}
		}
		/* HTTP rules are enforced by the agent's proxy: a new connection
		 * to such a port that did not come from the agent bypasses them. */
		if (dir == PAL_DIR_INGRESS && !tunnelled && d.pass && f->protocol == IPPROTO_TCP &&
		    pal_has_l7_rules(local_id, f->dport)) {
			d.pass = 0;
			d.reason = PAL_REASON_DENY_L7_BYPASS;
		}
	}

	if (d.pass && !f->fragment) {
		struct pal_ct_value nv = {
			.created_ns = now,
			.last_seen_ns = now,
			.packets = 1,
			.bytes = len,
			.local_identity = local_id,
			.peer_identity = d.peer_identity,
			.rule_id = d.rule_id,
			.flags = d.reason == PAL_REASON_AUDIT_WOULD_DENY ? PAL_CT_AUDIT : 0,
			.direction = dir,
			.initiator_is_b = swapped,
		};
		if (bpf_map_update_elem(&pal_conntrack, &ck, &nv, BPF_ANY) < 0 && (def || redirect)) {
			/* Without an entry the reply would be judged as new: fail closed. */
			d.pass = 0;
			d.reason = PAL_REASON_DENY_CT_FULL;
		}
	}

	pal_count(dir, d.reason, len);
	if (!d.pass || d.reason == PAL_REASON_AUDIT_WOULD_DENY ||
	    (cfg && (cfg->event_flags & PAL_EVENTS_ALLOWED)))
		pal_emit_event(f, dir, &d, local_id, ifindex, cgroup_id, now);
	return d.pass;
}

/* Parse the IP packet at l3_offset and judge it: 1 to pass, 0 to drop.
 * Non-IP packets pass; malformed IP packets are dropped. */
static __always_inline int pal_judge(struct __sk_buff *skb, const struct pal_endpoint *ep, __u8 dir,
				     __u32 l3_offset, __u32 ifindex, __u64 cgroup_id)
{
	struct pal_flow f = {};
	int r = pal_parse_direct(skb, l3_offset, &f);
	if (r == PAL_PARSE_SLOW) {
		__builtin_memset(&f, 0, sizeof(f));
		r = pal_parse(skb, l3_offset, &f);
	}
	if (r == PAL_PARSE_NOT_IP)
		return 1;
	if (r != PAL_PARSE_OK) {
		pal_count(dir, PAL_REASON_DENY_MALFORMED, skb->len);
		return 0;
	}
	return pal_enforce(skb, ep, dir, &f, ifindex, cgroup_id);
}

#endif
