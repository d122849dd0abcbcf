/* SPDX-License-Identifier: GPL-2.0 */
/* The enrolled cgroup a packet or a caller belongs to. */
#ifndef PAL_CGROUP_H
#define PAL_CGROUP_H

#define PAL_MAX_CGROUP_DEPTH 16

/* The entry of `map` for the deepest enrolled cgroup among `self` (a cgroup
 * id) and its ancestors, `ancestor(level)` naming the one at each level,
 * deepest first; sets *found_id to that cgroup. NULL when none is enrolled.
 * (A workload's processes may sit in child cgroups of the enrolled one.) */
#define PAL_DEEPEST_ENROLLED(map, self, ancestor, found_id) ({			\
	__u64 __self = (self);							\
	void *__ep = bpf_map_lookup_elem(&(map), &__self);			\
	if (__ep) {								\
		*(found_id) = __self;						\
	} else {								\
		for (int __level = PAL_MAX_CGROUP_DEPTH; __level >= 1; __level--) { \
			__u64 __anc = ancestor(__level);			\
			if (__anc == 0 || __anc == __self)			\
				continue;					\
			__ep = bpf_map_lookup_elem(&(map), &__anc);		\
			if (__ep) {						\
				*(found_id) = __anc;				\
				break;						\
			}							\
		}								\
	}									\
	__ep;									\
})

#endif
