/* SPDX-License-Identifier: GPL-2.0 */
/* Flow events to the agent through a ring buffer, limited per CPU. */
#ifndef PAL_EVENTS_H
#define PAL_EVENTS_H

#include "maps.h"
#include "parse.h"
#include "verdict.h"

/* Ring buffer event, limited per CPU by a token bucket so that a flood of
 * denied packets cannot starve the agent or the ring. */
static __always_inline void pal_emit_event(const struct pal_flow *f, __u8 dir, const struct pal_decision *d,
					   __u32 local_id, __u32 ifindex, __u64 cgroup_id, __u64 now)
{
	__u32 zero = 0;
	struct pal_config *cfg = bpf_map_lookup_elem(&pal_config, &zero);
	struct pal_event_bucket *b = bpf_map_lookup_elem(&pal_event_bucket, &zero);
	if (!cfg || !b || cfg->events_per_second == 0)
		return;
	__u64 rate = cfg->events_per_second;
	__u64 elapsed = now - b->last_refill_ns;
	if (elapsed >= PAL_NS_PER_SEC / rate) {
		__u64 add = elapsed * rate / PAL_NS_PER_SEC;
		b->tokens = b->tokens + add > rate ? rate : b->tokens + add;
		b->last_refill_ns = now;
	}
	if (b->tokens == 0) {
		b->suppressed += 1;
		return;
	}
	b->tokens -= 1;
	struct pal_flow_event *e = bpf_ringbuf_reserve(&pal_events, sizeof(*e), 0);
	if (!e) {
		b->lost += 1;
		return;
	}
	e->timestamp_ns = now;
	__builtin_memcpy(e->saddr, f->saddr, 16);
	__builtin_memcpy(e->daddr, f->daddr, 16);
	e->sport = bpf_ntohs(f->sport);
	e->dport = bpf_ntohs(f->dport);
	e->protocol = f->protocol;
	e->direction = dir;
	e->reason = d->reason;
	e->family = f->family;
	e->local_identity = local_id;
	e->peer_identity = d->peer_identity;
	e->rule_id = d->rule_id;
	e->ifindex = ifindex;
	e->cgroup_id = cgroup_id;
	bpf_ringbuf_submit(e, 0);
}

#endif
