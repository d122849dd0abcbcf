/* SPDX-License-Identifier: GPL-2.0 */
/* One verdict on one packet or connection, and the counters of verdicts by direction and reason. */
#ifndef PAL_VERDICT_H
#define PAL_VERDICT_H

#include "maps.h"

#define PAL_NS_PER_SEC 1000000000ULL

struct pal_decision {
	__u8 pass;
	__u8 reason;
	__u32 peer_identity;
	__u32 rule_id;
};

static __always_inline void pal_count(__u8 dir, __u8 reason, __u32 len)
{
	__u32 idx = PAL_COUNTER_INDEX(dir, reason);
	struct pal_counter *c = bpf_map_lookup_elem(&pal_counters, &idx);
	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
}

#endif
