/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one definition of every structure shared by the eBPF programs and the
 * Swift agent. The BPF objects include it directly; Swift imports it through
 * the CPalisadeShared module. Never mirror these layouts by hand.
 *
 * All structures are naturally aligned with explicit padding so that the
 * kernel's and Swift's view of a layout cannot differ.
 */
#ifndef PALISADE_SHARED_H
#define PALISADE_SHARED_H

#include <linux/types.h>

/* ---- Security identities -------------------------------------------- */

/* Reserved numeric identities. Workload identities start at
 * PAL_ID_FIRST_WORKLOAD; CIDR identities (one per prefix named in policy)
 * live in their own range so they never collide with workloads. */
enum pal_reserved_identity {
	PAL_ID_ANY = 0,          /* wildcard in policy keys only */
	PAL_ID_HOST = 1,         /* the node itself */
	PAL_ID_WORLD = 2,        /* anything outside the mesh */
	PAL_ID_UNKNOWN = 3,      /* inside a mesh range, but not a known workload */
	PAL_ID_FIRST_WORKLOAD = 256,
	PAL_ID_FIRST_CIDR = 0x01000000,
	PAL_ID_FIRST_FQDN = 0x02000000,
};

/* Peer classes. A rule's peer that names workloads (a selector) is not
 * expanded into one policy entry per matching identity: the agent gives every
 * identity of the cluster the class of the exact set of rule selectors it
 * matches (identities matching the same selectors share one class), and the
 * policy is keyed by class. So entries grow with selectors, not identities.
 * Classes are numbered from PAL_CLASS_FIRST, below PAL_ID_FIRST_CIDR; the
 * reserved identities and the CIDR identities are their own classes. */
#define PAL_CLASS_NONE  0u          /* matches no selector: no peer lookup */
#define PAL_CLASS_FIRST 256u

/* ---- Enumerations used in keys and values -------------------------- */

enum pal_direction {
	PAL_DIR_INGRESS = 0,
	PAL_DIR_EGRESS = 1,
	PAL_DIR_MAX = 2,
};

enum pal_verdict {
	PAL_VERDICT_NONE = 0,    /* no entry: fall back to the default */
	PAL_VERDICT_ALLOW = 1,
	PAL_VERDICT_DENY = 2,
	PAL_VERDICT_AUDIT = 3,   /* would deny, but audit mode lets it pass */
};

/* Why a packet was passed or dropped. Counters are indexed by
 * (direction, reason); the names are spelled out in Swift (DropReason). */
enum pal_reason {
	PAL_REASON_ALLOW_POLICY = 0,      /* new flow allowed by a rule */
	PAL_REASON_ALLOW_ESTABLISHED = 1, /* conntrack: established flow */
	PAL_REASON_ALLOW_REPLY = 2,       /* conntrack: reply of an allowed flow */
	PAL_REASON_ALLOW_UNENFORCED = 3,  /* endpoint not selected in that direction */
	PAL_REASON_DENY_POLICY = 4,       /* an explicit deny rule */
	PAL_REASON_DENY_DEFAULT = 5,      /* selected, and nothing allows it */
	PAL_REASON_AUDIT_WOULD_DENY = 6,  /* audit mode: passed, but would be denied */
	PAL_REASON_DENY_MALFORMED = 7,    /* header could not be parsed */
	PAL_REASON_DENY_FRAGMENT = 8,     /* non-first IP fragment to an enforced endpoint */
	PAL_REASON_DENY_CT_FULL = 9,      /* conntrack insert failed: fail closed */
	PAL_REASON_DENY_SPOOFED = 10,     /* pod sent from an address that is not its own */
	PAL_REASON_DENY_NO_ENDPOINT = 11, /* attached device with no endpoint entry */
	PAL_REASON_DENY_PLAINTEXT = 12,   /* strict mTLS: plaintext from outside the mesh */
	PAL_REASON_ALLOW_PLAINTEXT = 13,  /* permissive mTLS: plaintext from outside the mesh, allowed */
	PAL_REASON_ALLOW_REDIRECT = 14,   /* to the agent's outbound listener; judged at connect() */
	PAL_REASON_DENY_L7_BYPASS = 15,   /* a port with HTTP rules reached without the agent's proxy */
	PAL_REASON_DENY_REVOKED = 16,     /* a packet of a flow whose policy was revoked */
	PAL_REASON_MAX = 17,
};

#define PAL_COUNTER_SLOTS (PAL_DIR_MAX * PAL_REASON_MAX)
#define PAL_COUNTER_INDEX(dir, reason) ((dir) * PAL_REASON_MAX + (reason))

/* ---- Maps ------------------------------------------------------------ */

/* Capacities. The agent refuses an apply that would not fit. */
#define PAL_MAX_ENDPOINTS   4096
#define PAL_MAX_IPCACHE     262144   /* both generations together */
#define PAL_MAX_PEER_CLASS  262144   /* both generations together */
#define PAL_MAX_POLICY      262144   /* both generations together */
#define PAL_MAX_DEFAULTS    16384    /* both generations together */
#define PAL_MAX_CONNTRACK   262144
#define PAL_EVENTS_BYTES    (1u << 20)

/* Endpoint, keyed by host-side ifindex (pods) or cgroup id (cgroups). */
struct pal_endpoint {
	__u32 identity;
	__u32 endpoint_id;   /* scopes conntrack entries (the agent uses the identity) */
	__u32 flags;         /* PAL_EP_* */
	__u32 _pad;
};

/* The datapath drops packets a pod sends from an address the ipcache does
 * not map to the pod's own identity. */
#define PAL_EP_VERIFY_SOURCE (1u << 0)
/* Mutual TLS mode of the endpoint. Strict: a new inbound flow is dropped
 * unless the agent delivered it from the tunnel (PAL_MARK_*) or it comes
 * from a workload on this node. Permissive: admitted, counted. Neither:
 * disabled. */
#define PAL_EP_MTLS_STRICT     (1u << 1)
#define PAL_EP_MTLS_PERMISSIVE (1u << 2)

/* ipcache: LPM trie from address to identity, double-buffered like the
 * policy (the generation byte comes first in the matched bits), so that an
 * apply that renumbers CIDR identities or moves an address flips at once.
 * IPv4 is stored as IPv4-mapped IPv6 (::ffff:a.b.c.d). prefixlen counts the
 * 8 generation bits plus the address prefix. */
struct pal_ipcache_key {
	__u32 prefixlen;
	__u8 generation;
	__u8 addr[16];
	__u8 _pad[3];
};

#define PAL_IPCACHE_BITS_GENERATION 8

/* identity: the workload (or reserved:host) owning the address, else
 * reserved:world. cidr_identity: the identity of the longest CIDR named in
 * policy that contains the address, 0 if none. CIDR rules match on the
 * latter, so they judge each address on its own, workload or not. */
struct pal_ipcache_value {
	__u32 identity;
	__u32 cidr_identity;
	__u32 flags;          /* PAL_IPCACHE_* */
	__u32 peer_class;     /* the identity's peer class (pal_peer_class says the same) */
	__u32 fqdn_class;     /* the set of toFQDNs selectors whose names DNS answered with
	                       * this address (PAL_ID_FIRST_FQDN + n), 0 if none */
};

/* Peer class of an identity, for peers known by identity rather than by
 * address (a tunnelled connection's authenticated source). An identity
 * without an entry matches no rule selector (PAL_CLASS_NONE). */
struct pal_peer_class_key {
	__u32 identity;
	__u8 generation;
	__u8 _pad[3];
};

/* The address is a workload on another node, reached through the agents'
 * mTLS tunnel: enrolled callers' connect() to it is redirected. */
#define PAL_IPCACHE_REMOTE_WORKLOAD (1u << 0)

/* Policy: LPM trie, entries for this node's workloads only. The matched
 * bytes follow prefixlen in memory order: generation, direction, local
 * identity, peer class (a class of identities, a reserved identity or a CIDR
 * identity; 0 = any peer), protocol, port.
 * A rule on any protocol stops its prefix after the peer; on any port, after
 * the protocol; a port range is split into aligned power-of-two blocks.
 * The datapath looks up (peer class), (CIDR identity) and (PAL_ID_ANY); the
 * strongest verdict wins.
 * Padding bytes are part of the matched bits and are always zero. */
struct pal_policy_key {
	__u32 prefixlen;
	__u8 generation;
	__u8 direction;
	__u8 _pad[2];
	__u32 local_identity; /* network byte order, so the trie compares it bytewise */
	__u32 peer_class;     /* network byte order */
	__u8 protocol;
	__u8 _pad2;
	__u16 dport;          /* network byte order */
};

/* Prefix lengths (in bits) that end after each component. */
#define PAL_POLICY_BITS_PEER  96   /* any protocol, any port */
#define PAL_POLICY_BITS_PROTO 112  /* this protocol, any port */
#define PAL_POLICY_BITS_FULL  128  /* this protocol and port */

struct pal_policy_value {
	__u8 verdict;         /* enum pal_verdict */
	__u8 _pad;
	__u16 proxy_port;     /* L7 proxy port, 0 if none (network byte order) */
	__u32 rule_id;        /* index into the agent's rule table, for explain/dump */
	__u64 packets;        /* hit counters, updated by the datapath */
	__u64 bytes;
};

/* Per (generation, local identity, direction): is the endpoint selected by
 * a policy in that direction (default deny), and is that default audited. */
struct pal_defaults_key {
	__u8 generation;
	__u8 direction;
	__u16 _pad;
	__u32 local_identity;
};

struct pal_defaults_value {
	__u8 verdict;         /* PAL_VERDICT_DENY or PAL_VERDICT_AUDIT */
	__u8 lookups;         /* PAL_LOOKUP_*: which policy lookups can match */
	__u8 _pad[2];
	__u32 rule_id;        /* the policy that selected the endpoint */
};

/* Which kinds of peer the (local identity, direction) has entries for, so
 * the datapath skips policy lookups that cannot match. */
#define PAL_LOOKUP_PEER (1u << 0)   /* a workload or reserved identity */
#define PAL_LOOKUP_CIDR (1u << 1)   /* a CIDR identity */
#define PAL_LOOKUP_ANY  (1u << 2)   /* the wildcard peer */
#define PAL_LOOKUP_FQDN (1u << 3)   /* an FQDN class (addresses learned from DNS) */

/* Global configuration (array map, one entry). Policy is double-buffered:
 * the agent writes a complete rule set into the inactive slot, then flips
 * active_slot with one write, then clears the old slot. */
struct pal_config {
	__u32 active_slot;        /* 0 or 1: the generation byte of live entries */
	__u32 events_per_second;  /* flow events per CPU per second; 0 = none */
	__u64 generation;         /* monotonic apply counter, for status */
	__u32 event_flags;        /* PAL_EVENTS_* */
	__u32 _pad;
	__u16 dns_port;           /* the agent's DNS proxy port (network order), 0 = none */
	__u8 _pad2[6];
};

/* Denied and audit flows always produce events; allowed new flows only
 * when asked (they can be many; the same per-CPU rate limit applies). */
#define PAL_EVENTS_ALLOWED (1u << 0)

/* Packet and byte counters (per-CPU array of PAL_COUNTER_SLOTS). */
struct pal_counter {
	__u64 packets;
	__u64 bytes;
};

/* Conntrack, one entry per flow per endpoint, found with one lookup from
 * either direction: the two (address, port) ends are stored in a canonical
 * order (a < b, comparing the bytes as two native u64 words and the port),
 * and the value says which end initiated. endpoint_id must be unique per
 * endpoint on the node (pods: host-side ifindex; cgroups: see the agent),
 * so the two checks of one packet between local workloads stay separate. */
struct pal_ct_key {
	__u8 addr_a[16];
	__u8 addr_b[16];
	__u16 port_a;         /* network byte order */
	__u16 port_b;         /* network byte order */
	__u8 protocol;
	__u8 _pad[3];
	__u32 endpoint_id;
};

struct pal_ct_value {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u64 packets;
	__u64 bytes;
	__u32 local_identity;
	__u32 peer_identity;
	__u32 rule_id;
	__u8 flags;           /* PAL_CT_* */
	__u8 direction;       /* direction of the initiating packet at this endpoint */
	__u8 initiator_is_b;  /* 1 if (addr_b, port_b) opened the flow */
	__u8 _pad;
};

#define PAL_CT_ENDPOINT_CGROUP_BIT 0x80000000u

#define PAL_CT_SEEN_REPLY (1u << 0)
#define PAL_CT_CLOSING    (1u << 1)
#define PAL_CT_AUDIT      (1u << 2)
/* The policy that admitted this flow was revoked: the entry stays, for a
 * while, as a tombstone that drops the flow's packets, so neither end can
 * re-open it from mid-stream (a packet of the side that may still send
 * would otherwise start a new entry with itself as initiator, and the
 * revoked side's packets would pass as its replies). A TCP SYN on the
 * same addresses and ports is judged afresh. */
#define PAL_CT_REVOKED    (1u << 3)

/* Ring buffer event for a denied (or audited) new flow. */
struct pal_flow_event {
	__u64 timestamp_ns;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;          /* host byte order */
	__u16 dport;          /* host byte order */
	__u8 protocol;
	__u8 direction;
	__u8 reason;          /* enum pal_reason */
	__u8 family;          /* 4 or 6 */
	__u32 local_identity;
	__u32 peer_identity;
	__u32 rule_id;
	__u32 ifindex;
	__u64 cgroup_id;
};

/* Token bucket for deny events (per-CPU array, one entry). */
struct pal_event_bucket {
	__u64 last_refill_ns;
	__u64 tokens;
	__u64 suppressed;     /* events not sent because the bucket was empty */
	__u64 lost;           /* ringbuf reserve failed */
};

/* ---- Mesh: socket redirection and the tunnel ------------------------ */

/* The agent marks the sockets it opens to deliver tunnelled connections with
 * the authenticated source identity: PAL_MARK_MAGIC | identity. Setting
 * SO_MARK needs CAP_NET_ADMIN in the node's namespace and the kernel clears
 * marks on packets that cross namespaces, so a workload cannot forge one. */
#define PAL_MARK_MASK     0xff000000u
#define PAL_MARK_MAGIC    0x5a000000u
#define PAL_MARK_IDENTITY 0x00ffffffu

#define PAL_MAX_REDIRECTS 65536

/* A workload whose outbound TCP connections to remote workloads are
 * redirected to the agent, keyed by its cgroup v2 id (the connect hooks
 * find the deepest enrolled ancestor of the caller's cgroup). */
struct pal_mesh_endpoint {
	__u32 identity;
	__u32 agent_addr4;    /* the agent's outbound listener as the workload reaches it (network order) */
	__u8 agent_addr6[16];
	__u16 agent_port;     /* network byte order */
	__u8 _pad[2];
	__u32 endpoint_id;    /* conntrack scope of the workload (for the counters' peer) */
};

/* Ports of this node's workloads that have HTTP (L7) rules: enrolled
 * callers' connections to them are redirected to the agent's proxy even on
 * the same node, and the packet path admits new flows to them only from the
 * agent (marked sockets); anything else would bypass the rules. */
struct pal_l7_port_key {
	__u32 identity;       /* the destination workload's identity */
	__u16 port;           /* network byte order; 0: every port */
	__u8 protocol;        /* IPPROTO_TCP */
	__u8 _pad;
};
#define PAL_MAX_L7_PORTS 16384

/* Where a redirected connection was going, and who opened it. */
struct pal_redirect_origin {
	__u8 addr[16];        /* original destination (IPv4-mapped for IPv4) */
	__u16 port;           /* network byte order */
	__u8 family;          /* 4 or 6 */
	__u8 _pad;
	__u32 identity;       /* the caller's identity (from its cgroup, not its address) */
	__u32 peer_identity;  /* the destination's identity */
	__u32 rule_id;        /* the egress rule that allowed it */
	__u64 cgroup_id;      /* the enrolled cgroup of the caller */
};

/* A redirected connection as the agent sees it when it accepts: the
 * caller's (address, port) and the agent's (address, port). */
struct pal_redirect_key {
	__u8 client_addr[16]; /* IPv4-mapped for IPv4 */
	__u8 agent_addr[16];
	__u16 client_port;    /* network byte order */
	__u16 agent_port;     /* network byte order */
	__u32 _pad;
};

/* Same-node fast path: established TCP connections between two workloads
 * of this node, keyed by their (local, remote) ends as each socket sees
 * them; sk_msg hands a sender's data straight to its peer socket. */
struct pal_sock_key {
	__u8 local_addr[16];  /* IPv4-mapped for IPv4 */
	__u8 remote_addr[16];
	__u16 local_port;     /* network byte order */
	__u16 remote_port;    /* network byte order */
	__u32 _pad;
};

/* ---- DNS: the agent's proxy, and the kernel's way around it -------- */

/* Enrolled workloads' DNS (UDP and TCP to port 53, whatever the resolver)
 * goes to the agent's DNS proxy (the mesh endpoint's agent address, port
 * pal_config.dns_port) while it is there: the proxy's UDP socket
 * sits in pal_dns_proxy, and a socket leaves a sockmap when it closes, so
 * when the agent is stopped or killed the hooks find nothing and DNS goes
 * straight to the resolver (the packet programs judge it as any flow). */
#define PAL_DNS_PORT 53
#define PAL_DNS_PROXY_UDP 0   /* index in pal_dns_proxy */
#define PAL_MAX_DNS_FLOWS 65536

/* A workload's DNS datagram the hooks sent to the proxy: pal_dns_sock is
 * keyed by socket cookie (filed by sendmsg/connect, read by recvmsg to put
 * the resolver's address back as the answer's source), pal_dns_flow by the
 * datagram's addresses as the proxy receives it (filed on the way out, read
 * by the proxy). Values are pal_redirect_origin: the resolver the workload
 * addressed and who asked. */

#endif /* PALISADE_SHARED_H */
