import CPalisadeShared
import PalisadeIdentity

/// Everything the compiler needs to know about the world: the workload
/// identities (with labels and addresses) and the node's own addresses.
public struct Universe: Sendable {
    public var workloads: [NumericIdentity: WorkloadIdentity]
    public var hostAddresses: [IPAddress]
    public init(workloads: [NumericIdentity: WorkloadIdentity], hostAddresses: [IPAddress]) {
        self.workloads = workloads; self.hostAddresses = hostAddresses
    }
}

public enum Verdict: UInt8, Codable, Sendable, CustomStringConvertible {
    case none = 0, allow = 1, deny = 2, audit = 3
    /// Deny beats audit (would deny) beats allow; the datapath ranks the same way.
    public var rank: Int { switch self { case .none: 0; case .allow: 1; case .audit: 2; case .deny: 3 } }
    public var description: String { switch self { case .none: "none"; case .allow: "allow"; case .deny: "deny"; case .audit: "audit (would deny)" } }
}

/// What a rule id in the maps stands for.
public struct RuleInfo: Codable, Hashable, Sendable {
    public enum Kind: String, Codable, Sendable { case rule, defaultDeny = "default-deny" }
    public var id: UInt32
    public var kind: Kind
    public var policy: String
    public var direction: Direction
    public var action: Action
    public var mode: PolicyMode
    public var location: SourceLocation

    public var summary: String {
        switch kind {
        case .rule: return "\(action) rule of policy \(policy) (\(direction)) at \(location)\(mode == .audit ? " [audit]" : "")"
        case .defaultDeny: return "default deny: policy \(policy) at \(location) selects the workload for \(direction)\(mode == .audit ? " [audit]" : "") and nothing allows it"
        }
    }
}

/// One policy map entry before the generation is stamped on it.
public struct PolicyEntry: Hashable, Sendable {
    public var local: NumericIdentity
    public var direction: Direction
    public var peer: NumericIdentity        // .any = wildcard
    public var proto: UInt8?                // nil = any protocol
    public var port: UInt16                 // masked to portBits
    public var portBits: Int                // 0 = any port of proto
    public var verdict: Verdict
    public var ruleID: UInt32

    public init(local: NumericIdentity, direction: Direction, peer: NumericIdentity, proto: UInt8?, port: UInt16, portBits: Int,
                verdict: Verdict, ruleID: UInt32) {
        self.local = local; self.direction = direction; self.peer = peer; self.proto = proto
        self.port = port; self.portBits = portBits; self.verdict = verdict; self.ruleID = ruleID
    }

    public struct Slot: Hashable, Sendable {
        var local: NumericIdentity, direction: Direction, peer: NumericIdentity, proto: UInt8?, port: UInt16, portBits: Int
    }
    var slot: Slot { Slot(local: local, direction: direction, peer: peer, proto: proto, port: port, portBits: portBits) }

    public var prefixLength: UInt32 {
        proto == nil ? UInt32(PAL_POLICY_BITS_PEER) : UInt32(PAL_POLICY_BITS_PROTO) + UInt32(portBits)
    }

    /// The kernel key, in the layout of palisade_shared.h.
    public func key(generation: UInt8) -> pal_policy_key {
        var k = pal_policy_key()
        k.prefixlen = prefixLength
        k.generation = generation
        k.direction = direction == .ingress ? UInt8(PAL_DIR_INGRESS.rawValue) : UInt8(PAL_DIR_EGRESS.rawValue)
        k.local_identity = local.rawValue.bigEndian
        k.peer_identity = peer.rawValue.bigEndian
        k.protocol = proto ?? 0
        k.dport = port.bigEndian
        return k
    }

    public var value: pal_policy_value {
        var v = pal_policy_value()
        v.verdict = verdict.rawValue
        v.rule_id = ruleID
        return v
    }
}

public struct DefaultEntry: Hashable, Sendable {
    public var local: NumericIdentity
    public var direction: Direction
    public var verdict: Verdict   // deny or audit
    public var ruleID: UInt32
    /// PAL_LOOKUP_* bits: which peer kinds have entries (the rest are skipped).
    public var lookups: UInt8

    public init(local: NumericIdentity, direction: Direction, verdict: Verdict, ruleID: UInt32,
                lookups: UInt8 = UInt8(PAL_LOOKUP_PEER | PAL_LOOKUP_CIDR | PAL_LOOKUP_ANY)) {
        self.local = local; self.direction = direction; self.verdict = verdict; self.ruleID = ruleID; self.lookups = lookups
    }

    public func key(generation: UInt8) -> pal_defaults_key {
        var k = pal_defaults_key()
        k.generation = generation
        k.direction = direction == .ingress ? UInt8(PAL_DIR_INGRESS.rawValue) : UInt8(PAL_DIR_EGRESS.rawValue)
        k.local_identity = local.rawValue
        return k
    }

    public var value: pal_defaults_value {
        var v = pal_defaults_value()
        v.verdict = verdict.rawValue
        v.lookups = lookups
        v.rule_id = ruleID
        return v
    }
}

public struct IPCacheEntry: Hashable, Sendable {
    public var cidr: CIDR
    public var identity: NumericIdentity
    /// Longest policy CIDR containing this prefix (nil if none).
    public var cidrIdentity: NumericIdentity?
    /// A workload on another node (its connections are redirected to the tunnel).
    public var remote = false

    public var value: pal_ipcache_value {
        var v = pal_ipcache_value()
        v.identity = identity.rawValue
        v.cidr_identity = cidrIdentity?.rawValue ?? 0
        v.flags = remote ? UInt32(PAL_IPCACHE_REMOTE_WORKLOAD) : 0
        return v
    }

    public func key(generation: UInt8) -> pal_ipcache_key {
        var k = pal_ipcache_key()
        k.prefixlen = UInt32(PAL_IPCACHE_BITS_GENERATION) + UInt32(cidr.prefixLength)
        k.generation = generation
        withUnsafeMutableBytes(of: &k.addr) { raw in
            for i in 0..<16 { raw[i] = cidr.address.bytes[i] }
        }
        return k
    }
}

/// The result of compiling a policy set against a universe: the complete
/// content of one generation of the kernel's policy state.
public struct CompiledPolicy: Sendable {
    public var entries: [PolicyEntry]
    public var defaults: [DefaultEntry]
    public var ipcache: [IPCacheEntry]
    public var rules: [RuleInfo]          // rules[id - 1]
    public var cidrIdentities: [CIDR: NumericIdentity]

    public init(entries: [PolicyEntry], defaults: [DefaultEntry], ipcache: [IPCacheEntry], rules: [RuleInfo], cidrIdentities: [CIDR: NumericIdentity]) {
        self.entries = entries; self.defaults = defaults; self.ipcache = ipcache; self.rules = rules; self.cidrIdentities = cidrIdentities
    }

    public func rule(_ id: UInt32) -> RuleInfo? {
        id >= 1 && Int(id) <= rules.count ? rules[Int(id) - 1] : nil
    }
}

public struct CompileError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

public enum PolicyCompiler {
    public static func compile(_ set: PolicySet, universe: Universe) throws -> CompiledPolicy {
        var rules: [RuleInfo] = []
        func newRule(_ kind: RuleInfo.Kind, _ p: Policy, _ d: Direction, _ a: Action, _ loc: SourceLocation) -> UInt32 {
            rules.append(RuleInfo(id: UInt32(rules.count + 1), kind: kind, policy: p.name, direction: d, action: a, mode: p.mode, location: loc))
            return UInt32(rules.count)
        }

        // CIDR identities: one per distinct prefix named anywhere, numbered in order.
        var cidrs = Set<CIDR>()
        for p in set.policies {
            for d in Direction.allCases {
                for r in p.rules(d) ?? [] {
                    for case .cidr(let c, let except) in r.peers { cidrs.insert(c); except.forEach { cidrs.insert($0) } }
                }
            }
        }
        var cidrIdentities: [CIDR: NumericIdentity] = [:]
        for (i, c) in cidrs.sorted().enumerated() { cidrIdentities[c] = NumericIdentity(NumericIdentity.firstCIDR + UInt32(i)) }

        // ipcache: workloads, host, CIDRs. One owner per address.
        var ipcache: [CIDR: NumericIdentity] = [:]
        var remote = Set<CIDR>()
        for (id, w) in universe.workloads.sorted(by: { $0.key < $1.key }) {
            for a in w.addresses {
                let c = CIDR(address: a, mappedPrefixLength: 128)
                if w.remoteAddresses.contains(a) { remote.insert(c) }
                if let other = ipcache[c], other != id {
                    throw CompileError(message: "address \(a) belongs to two workloads (identities \(other) and \(id))")
                }
                ipcache[c] = id
            }
        }
        for a in universe.hostAddresses {
            let c = CIDR(address: a, mappedPrefixLength: 128)
            if let other = ipcache[c], other != .host {
                throw CompileError(message: "address \(a) is both a host address and a workload's (identity \(other))")
            }
            ipcache[c] = .host
        }
        for c in cidrIdentities.keys where ipcache[c] == nil { ipcache[c] = .world }
        // Each entry also carries the longest policy CIDR containing it.
        let lengths = Set(cidrIdentities.keys.map(\.prefixLength)).sorted(by: >)
        func cidrIdentity(of c: CIDR) -> NumericIdentity? {
            for len in lengths where len <= c.prefixLength {
                if let id = cidrIdentities[CIDR(address: c.address, mappedPrefixLength: len)] { return id }
            }
            return nil
        }

        let matcher = PeerMatcher(universe: universe, cidrIdentities: cidrIdentities)
        var entries: [PolicyEntry.Slot: PolicyEntry] = [:]
        var defaults: [String: DefaultEntry] = [:]

        for p in set.policies {
            let locals = universe.workloads.filter { p.selector.matches($0.value) }.keys.sorted()
            for d in Direction.allCases {
                guard let rs = p.rules(d) else { continue }
                let defVerdict: Verdict = p.mode == .enforce ? .deny : .audit
                let defID = newRule(.defaultDeny, p, d, .deny, p.location)
                for l in locals {
                    let key = "\(l.rawValue)/\(d)"
                    if let old = defaults[key], old.verdict.rank >= defVerdict.rank { continue }
                    defaults[key] = DefaultEntry(local: l, direction: d, verdict: defVerdict, ruleID: defID, lookups: 0)
                }
                for r in rs {
                    let id = newRule(.rule, p, d, r.action, r.location)
                    let verdict: Verdict = r.action == .allow ? .allow : (p.mode == .enforce ? .deny : .audit)
                    let peers = matcher.identities(for: r.peers)
                    let ports = portSlots(r.ports)
                    for l in locals {
                        for peer in peers {
                            for (proto, port, bits) in ports {
                                let e = PolicyEntry(local: l, direction: d, peer: peer, proto: proto, port: port, portBits: bits, verdict: verdict, ruleID: id)
                                if let old = entries[e.slot], old.verdict.rank >= verdict.rank { continue }
                                entries[e.slot] = e
                            }
                        }
                    }
                }
            }
        }

        // The trie answers with the longest match; a broader deny must still
        // beat a narrower allow, so narrower entries inherit a stronger verdict.
        var resolved = entries
        for (slot, e) in entries {
            for anc in ancestors(of: slot) {
                if let a = entries[anc], a.verdict.rank > resolved[slot]!.verdict.rank {
                    resolved[slot]!.verdict = a.verdict
                    resolved[slot]!.ruleID = a.ruleID
                }
            }
            _ = e
        }

        // Tell the datapath which lookups can match for each (local, direction).
        for e in resolved.values {
            let bit = e.peer == .any ? PAL_LOOKUP_ANY : (e.peer.isCIDR ? PAL_LOOKUP_CIDR : PAL_LOOKUP_PEER)
            defaults["\(e.local.rawValue)/\(e.direction)"]?.lookups |= UInt8(bit)
        }

        return CompiledPolicy(
            entries: resolved.values.sorted { ($0.local, $0.direction.rawValue, $0.peer, $0.proto ?? 0, $0.port, $0.portBits) < ($1.local, $1.direction.rawValue, $1.peer, $1.proto ?? 0, $1.port, $1.portBits) },
            defaults: defaults.values.sorted { ($0.local, $0.direction.rawValue) < ($1.local, $1.direction.rawValue) },
            ipcache: ipcache.map { IPCacheEntry(cidr: $0.key, identity: $0.value, cidrIdentity: cidrIdentity(of: $0.key),
                                                 remote: remote.contains($0.key)) }.sorted { $0.cidr < $1.cidr },
            rules: rules,
            cidrIdentities: cidrIdentities)
    }

    /// Every broader slot that the trie could also hold for this one.
    static func ancestors(of s: PolicyEntry.Slot) -> [PolicyEntry.Slot] {
        guard let proto = s.proto else { return [] }
        var out = [PolicyEntry.Slot(local: s.local, direction: s.direction, peer: s.peer, proto: nil, port: 0, portBits: 0)]
        for bits in 0..<s.portBits {
            let mask: UInt16 = bits == 0 ? 0 : ~UInt16(0) << (16 - bits)
            out.append(.init(local: s.local, direction: s.direction, peer: s.peer, proto: proto, port: s.port & mask, portBits: bits))
        }
        return out
    }

    /// (protocol, port prefix, prefix bits) triples covering the port rules.
    static func portSlots(_ ports: [PortRule]) -> [(UInt8?, UInt16, Int)] {
        if ports.isEmpty { return [(nil, 0, 0)] }
        var out: [(UInt8?, UInt16, Int)] = []
        for p in ports {
            guard let proto = p.proto else { out.append((nil, 0, 0)); continue }
            guard let first = p.first, let last = p.last else { out.append((proto.rawValue, 0, 0)); continue }
            for (v, bits) in rangeToPrefixes(first, last) { out.append((proto.rawValue, v, bits)) }
        }
        return out
    }

    /// Splits [first, last] into the fewest aligned (value, prefix bits) blocks.
    public static func rangeToPrefixes(_ first: UInt16, _ last: UInt16) -> [(UInt16, Int)] {
        var out: [(UInt16, Int)] = []
        var lo = UInt32(first)
        let hi = UInt32(last)
        while lo <= hi {
            var size: UInt32 = 1
            var bits = 16
            while bits > 0 {
                let bigger = size << 1
                if lo % bigger != 0 || lo + bigger - 1 > hi { break }
                size = bigger
                bits -= 1
            }
            out.append((UInt16(lo), bits))
            lo += size
        }
        return out
    }
}

/// Resolves rule peers to the numeric identities the datapath will see.
struct PeerMatcher {
    let universe: Universe
    let cidrIdentities: [CIDR: NumericIdentity]
    /// Policy CIDRs sorted by address, so the prefixes inside one CIDR are a
    /// contiguous run found by binary search (10,000 CIDR rules stay linear).
    let sortedCIDRs: [(CIDR, NumericIdentity)]

    init(universe: Universe, cidrIdentities: [CIDR: NumericIdentity]) {
        self.universe = universe
        self.cidrIdentities = cidrIdentities
        sortedCIDRs = cidrIdentities.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    func prefixes(inside c: CIDR) -> ArraySlice<(CIDR, NumericIdentity)> {
        var lo = 0, hi = sortedCIDRs.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if sortedCIDRs[mid].0.address < c.address { lo = mid + 1 } else { hi = mid }
        }
        var end = lo
        while end < sortedCIDRs.count && c.contains(sortedCIDRs[end].0.address) { end += 1 }
        return sortedCIDRs[lo..<end]
    }

    func identities(for peers: [Peer]) -> [NumericIdentity] {
        if peers.isEmpty { return [.any] }
        var out = Set<NumericIdentity>()
        for p in peers {
            switch p {
            case .entity(.all): return [.any]
            case .entity(.host): out.insert(.host)
            case .entity(.world):
                out.insert(.world)
            case .workloads(let sel):
                for (id, w) in universe.workloads where sel.matches(w) { out.insert(id) }
            case .cidr(let c, let except):
                // Every address resolves to the longest policy CIDR holding it;
                // this rule matches those prefixes inside c and outside the excepts.
                for (prefix, id) in prefixes(inside: c) where prefix.prefixLength >= c.prefixLength
                    && !except.contains(where: { $0.contains(prefix) }) {
                    out.insert(id)
                }
            }
        }
        return out.sorted()
    }
}
