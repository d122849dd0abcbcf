import CPalisadeShared
import PalisadeIdentity

/// Everything the compiler needs to know about the world: the workload
/// identities (with labels and addresses) and the node's own addresses.
public struct Universe: Sendable {
    public var workloads: [NumericIdentity: WorkloadIdentity]
    public var hostAddresses: [IPAddress]
    /// Addresses DNS answered with, and for which names (toFQDNs rules).
    public var learned: LearnedNames
    public init(workloads: [NumericIdentity: WorkloadIdentity], hostAddresses: [IPAddress], learned: LearnedNames = [:]) {
        self.workloads = workloads; self.hostAddresses = hostAddresses; self.learned = learned
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
    public enum Kind: String, Codable, Sendable { case rule, defaultDeny = "default-deny", lockdown }
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
        case .lockdown: return "locked down: policy \(policy) at \(location) selects the workload for \(direction)\(mode == .audit ? " [audit]" : ""), but the policy set could not be installed (palisade status says why)"
        }
    }
}

/// One policy map entry before the generation is stamped on it.
public struct PolicyEntry: Hashable, Sendable {
    public var local: NumericIdentity
    public var direction: Direction
    /// A peer class (the selectors an identity matches), a reserved identity,
    /// a CIDR identity, or .any (wildcard); see palisade_shared.h.
    public var peer: NumericIdentity
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
        k.peer_class = peer.rawValue.bigEndian
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

/// identity -> peer class, for peers known by identity (pal_peer_class).
public struct PeerClassEntry: Hashable, Sendable {
    public var identity: NumericIdentity
    public var peerClass: NumericIdentity
    public func key(generation: UInt8) -> pal_peer_class_key {
        var k = pal_peer_class_key()
        k.identity = identity.rawValue
        k.generation = generation
        return k
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
    /// The identity's peer class (nil: it matches no rule selector).
    public var peerClass: NumericIdentity?
    /// The FQDN class of a learned address (nil: DNS taught nothing about it).
    public var fqdnClass: NumericIdentity?

    public init(cidr: CIDR, identity: NumericIdentity, cidrIdentity: NumericIdentity? = nil, remote: Bool = false,
                peerClass: NumericIdentity? = nil, fqdnClass: NumericIdentity? = nil) {
        self.cidr = cidr; self.identity = identity; self.cidrIdentity = cidrIdentity; self.remote = remote
        self.peerClass = peerClass; self.fqdnClass = fqdnClass
    }

    public var value: pal_ipcache_value {
        var v = pal_ipcache_value()
        v.identity = identity.rawValue
        v.cidr_identity = cidrIdentity?.rawValue ?? 0
        v.flags = remote ? UInt32(PAL_IPCACHE_REMOTE_WORKLOAD) : 0
        v.peer_class = peerClass?.rawValue ?? (identity.isWorkload ? PAL_CLASS_NONE : identity.rawValue)
        v.fqdn_class = fqdnClass?.rawValue ?? 0
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
    /// identity -> peer class, for every identity matching some rule selector.
    public var peerClasses: [NumericIdentity: NumericIdentity]
    /// What each peer class stands for: the rule selectors its identities match.
    public var classSelectors: [NumericIdentity: [String]]
    /// FQDN classes: each set of toFQDNs selectors that some learned address
    /// matches (and every single selector in force, so that a new address
    /// usually needs one ipcache write, not a new generation).
    public var fqdnClasses: [Set<FQDNSelector>: NumericIdentity] = [:]
    /// The toFQDNs selectors in force on this node.
    public var fqdnSelectors: [FQDNSelector] = []
    /// DNS rules: for a local workload that has any, the names it may resolve.
    public var dnsRules: [NumericIdentity: [FQDNSelector]] = [:]

    public init(entries: [PolicyEntry], defaults: [DefaultEntry], ipcache: [IPCacheEntry], rules: [RuleInfo], cidrIdentities: [CIDR: NumericIdentity],
                peerClasses: [NumericIdentity: NumericIdentity] = [:], classSelectors: [NumericIdentity: [String]] = [:]) {
        self.entries = entries; self.defaults = defaults; self.ipcache = ipcache; self.rules = rules; self.cidrIdentities = cidrIdentities
        self.peerClasses = peerClasses; self.classSelectors = classSelectors
    }

    public func rule(_ id: UInt32) -> RuleInfo? {
        id >= 1 && Int(id) <= rules.count ? rules[Int(id) - 1] : nil
    }

    /// The entries of the identity -> class map, in identity order.
    public var peerClassEntries: [PeerClassEntry] {
        peerClasses.sorted { $0.key < $1.key }.map { PeerClassEntry(identity: $0.key, peerClass: $0.value) }
    }

    /// The class a peer known by identity is looked up with (reserved
    /// identities are their own class; nil: it matches no selector).
    public func peerClass(of identity: NumericIdentity) -> NumericIdentity? {
        identity.isWorkload ? peerClasses[identity] : identity
    }

    /// Everything the kernel holds for this generation, all maps together.
    public var totalEntries: Int { entries.count + defaults.count + peerClasses.count }
}

public struct CompileError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

public enum PolicyCompiler {
    /// Compiles for the workloads of this node (`isLocal`): policy entries
    /// are keyed by (local workload, peer class), where a class stands for
    /// the set of rule selectors an identity matches, so their number grows
    /// with the selectors in force, not with the identities of the cluster.
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

        // Only this node's workloads get entries; only policies selecting one matter here.
        let localIDs = universe.workloads.filter { $0.value.isLocal }.keys.sorted()
        let inForce: [(policy: Policy, locals: [NumericIdentity])] = set.policies.map { p in
            (p, localIDs.filter { p.selector.matches(universe.workloads[$0]!) })
        }
        let classes = PeerClasses(universe: universe, policies: inForce.filter { !$0.locals.isEmpty }.map(\.policy))
        let fqdn = FQDNClasses(policies: inForce.filter { !$0.locals.isEmpty }.map(\.policy), learned: universe.learned)
        // A learned address outside the mesh gets an entry of its own.
        for a in fqdn.classOfAddress.keys where ipcache[CIDR(address: a, mappedPrefixLength: 128)] == nil {
            ipcache[CIDR(address: a, mappedPrefixLength: 128)] = .world
        }
        let matcher = PeerMatcher(cidrIdentities: cidrIdentities, classes: classes, fqdn: fqdn)
        var entries: [PolicyEntry.Slot: PolicyEntry] = [:]
        var defaults: [String: DefaultEntry] = [:]
        func add(_ e: PolicyEntry) {
            if let old = entries[e.slot], old.verdict.rank >= e.verdict.rank { return }
            entries[e.slot] = e
        }

        for (p, locals) in inForce {
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
                    guard !locals.isEmpty else { continue }
                    let verdict: Verdict = r.action == .allow ? .allow : (p.mode == .enforce ? .deny : .audit)
                    let numbered = r.ports.filter { $0.name == nil }
                    let named = r.ports.filter { $0.name != nil }
                    if r.ports.isEmpty || !numbered.isEmpty {
                        let peers = matcher.peerKeys(for: r.peers)
                        let ports = portSlots(numbered)
                        for l in locals {
                            for peer in peers {
                                for (proto, port, bits) in ports {
                                    add(PolicyEntry(local: l, direction: d, peer: peer, proto: proto, port: port, portBits: bits, verdict: verdict, ruleID: id))
                                }
                            }
                        }
                    }
                    for np in named {
                        guard let name = np.name, let proto = np.proto else { continue }
                        if d == .ingress {
                            // Resolved on the destination: each local workload's own number.
                            let peers = matcher.peerKeys(for: r.peers)
                            for l in locals {
                                for n in universe.workloads[l]!.ports where n.name == name && n.proto == proto {
                                    for peer in peers {
                                        add(PolicyEntry(local: l, direction: d, peer: peer, proto: proto.rawValue, port: n.port, portBits: 16, verdict: verdict, ruleID: id))
                                    }
                                }
                            }
                        } else {
                            // Resolved on the peer: a class per (selector, number).
                            for sel in PeerClasses.namedPortSelectors(r.peers) {
                                for (number, peerClasses) in classes.classes(containing: sel, name: name, proto: proto) {
                                    for l in locals {
                                        for peer in peerClasses {
                                            add(PolicyEntry(local: l, direction: d, peer: peer, proto: proto.rawValue, port: number, portBits: 16, verdict: verdict, ruleID: id))
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }

        // The trie answers with the longest match; a broader deny must still
        // beat a narrower allow, so narrower entries inherit a stronger verdict.
        var resolved = entries
        for slot in entries.keys {
            for anc in ancestors(of: slot) {
                if let a = entries[anc], a.verdict.rank > resolved[slot]!.verdict.rank {
                    resolved[slot]!.verdict = a.verdict
                    resolved[slot]!.ruleID = a.ruleID
                }
            }
        }

        // Tell the datapath which lookups can match for each (local, direction).
        for e in resolved.values {
            let bit = e.peer == .any ? PAL_LOOKUP_ANY : (e.peer.isFQDN ? PAL_LOOKUP_FQDN : (e.peer.isCIDR ? PAL_LOOKUP_CIDR : PAL_LOOKUP_PEER))
            defaults["\(e.local.rawValue)/\(e.direction)"]?.lookups |= UInt8(bit)
        }

        // DNS rules: the names each local workload may resolve (the union of
        // its policies' `dns` lists), for workloads that have any.
        var dnsRules: [NumericIdentity: [FQDNSelector]] = [:]
        for (p, locals) in inForce {
            let names = (p.egress ?? []).compactMap(\.dns).flatMap { $0 }
            guard (p.egress ?? []).contains(where: { $0.dns != nil }) else { continue }
            for l in locals { dnsRules[l, default: []].append(contentsOf: names) }
        }

        var compiled = CompiledPolicy(
            entries: resolved.values.sorted { ($0.local, $0.direction.rawValue, $0.peer, $0.proto ?? 0, $0.port, $0.portBits) < ($1.local, $1.direction.rawValue, $1.peer, $1.proto ?? 0, $1.port, $1.portBits) },
            defaults: defaults.values.sorted { ($0.local, $0.direction.rawValue) < ($1.local, $1.direction.rawValue) },
            ipcache: ipcache.map { IPCacheEntry(cidr: $0.key, identity: $0.value, cidrIdentity: cidrIdentity(of: $0.key),
                                                 remote: remote.contains($0.key), peerClass: classes.classOf[$0.value],
                                                 fqdnClass: $0.key.prefixLength == 128 ? fqdn.classOfAddress[$0.key.address] : nil) }.sorted { $0.cidr < $1.cidr },
            rules: rules,
            cidrIdentities: cidrIdentities,
            peerClasses: classes.classOf,
            classSelectors: classes.descriptions())
        compiled.fqdnClasses = fqdn.classOfSet
        compiled.fqdnSelectors = fqdn.selectors
        compiled.dnsRules = dnsRules.mapValues { Array(Set($0)).sorted() }
        return compiled
    }

    /// Holds at default deny every local workload that `refused` selects in
    /// a direction `compiled` leaves unenforced: used when the declared
    /// policy cannot be installed, so that a workload it should isolate is
    /// never left open while the previous policy stays for the others.
    /// Returns the identities locked down.
    @discardableResult
    public static func lockDown(_ compiled: inout CompiledPolicy, selectedBy refused: PolicySet, universe: Universe) -> Set<NumericIdentity> {
        var enforced = Set(compiled.defaults.map { "\($0.local.rawValue)/\($0.direction)" })
        var locked = Set<NumericIdentity>()
        for p in refused.policies {
            for d in Direction.allCases where p.rules(d) != nil {
                var ruleID: UInt32?
                for (id, w) in universe.workloads.sorted(by: { $0.key < $1.key }) where w.isLocal && p.selector.matches(w) {
                    guard enforced.insert("\(id.rawValue)/\(d)").inserted else { continue }
                    if ruleID == nil {
                        compiled.rules.append(RuleInfo(id: UInt32(compiled.rules.count + 1), kind: .lockdown, policy: p.name, direction: d,
                                                       action: .deny, mode: p.mode, location: p.location))
                        ruleID = UInt32(compiled.rules.count)
                    }
                    compiled.defaults.append(DefaultEntry(local: id, direction: d, verdict: p.mode == .enforce ? .deny : .audit,
                                                          ruleID: ruleID!, lookups: 0))
                    locked.insert(id)
                }
            }
        }
        return locked
    }

    /// The number of entries the pairwise design (one per local workload,
    /// peer identity and port) would write for this policy set: what
    /// tools/bench/policy-scale compares the classes with.
    public static func pairwiseEntryCount(_ set: PolicySet, universe: Universe) -> Int {
        var total = 0
        for p in set.policies {
            let locals = universe.workloads.values.filter { p.selector.matches($0) }.count
            for d in Direction.allCases {
                for r in p.rules(d) ?? [] {
                    var peers = 0
                    if r.peers.isEmpty { peers = 1 }
                    for peer in r.peers {
                        switch peer {
                        case .workloads(let sel): peers += universe.workloads.values.filter { sel.matches($0) }.count
                        default: peers += 1
                        }
                    }
                    total += locals * peers * max(1, portSlots(r.ports.filter { $0.name == nil }).count + r.ports.filter { $0.name != nil }.count)
                }
            }
        }
        return total
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

/// Resolves rule peers to the policy keys the datapath will look up:
/// peer classes, reserved identities, CIDR identities or the wildcard.
struct PeerMatcher {
    let cidrIdentities: [CIDR: NumericIdentity]
    let classes: PeerClasses
    let fqdn: FQDNClasses
    /// Policy CIDRs sorted by address, so the prefixes inside one CIDR are a
    /// contiguous run found by binary search (10,000 CIDR rules stay linear).
    let sortedCIDRs: [(CIDR, NumericIdentity)]

    init(cidrIdentities: [CIDR: NumericIdentity], classes: PeerClasses, fqdn: FQDNClasses) {
        self.cidrIdentities = cidrIdentities
        self.classes = classes
        self.fqdn = fqdn
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

    func peerKeys(for peers: [Peer]) -> [NumericIdentity] {
        if peers.isEmpty { return [.any] }
        var out = Set<NumericIdentity>()
        for p in peers {
            switch p {
            case .entity(.all): return [.any]
            case .entity(.host): out.insert(.host)
            case .entity(.world): out.insert(.world)
            case .workloads(let sel):
                out.formUnion(classes.classes(containing: sel))
            case .fqdn(let sel):
                out.formUnion(fqdn.classes(containing: sel))
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

/// Peer classes: every identity of the universe gets the class of the exact
/// set of rule selectors it matches (among the policies that select a
/// workload of this node). A selector with an egress named port counts once
/// per port number its members give that name, so a class also fixes the
/// number each named port resolves to.
struct PeerClasses {
    struct Key: Hashable {
        var selector: WorkloadSelector
        var namedPort: NamedPort?
    }
    private(set) var keys: [Key] = []
    private var keyIndex: [Key: Int] = [:]
    /// identity -> class (identities matching no selector have none).
    private(set) var classOf: [NumericIdentity: NumericIdentity] = [:]
    /// class -> the keys its identities match.
    private(set) var members: [NumericIdentity: [Int]] = [:]
    /// key -> the classes containing it.
    private var classesByKey: [Int: [NumericIdentity]] = [:]

    /// The selectors an egress named port is resolved with: workload
    /// selectors, and any workload for an empty peer list or `all`.
    static func namedPortSelectors(_ peers: [Peer]) -> [WorkloadSelector] {
        if peers.isEmpty { return [WorkloadSelector()] }
        var out: [WorkloadSelector] = []
        for p in peers {
            switch p {
            case .workloads(let s): out.append(s)
            case .entity(.all): out.append(WorkloadSelector())
            default: break
            }
        }
        return out
    }

    init(universe: Universe, policies: [Policy]) {
        // The keys: each distinct selector, and (selector, named port) pairs for egress.
        var plain = [WorkloadSelector](), named = [(WorkloadSelector, String, IPProtocol)]()
        var seenPlain = Set<WorkloadSelector>(), seenNamed = Set<String>()
        for p in policies {
            for d in Direction.allCases {
                for r in p.rules(d) ?? [] {
                    let hasNumbered = r.ports.isEmpty || r.ports.contains { $0.name == nil } || d == .ingress
                    if hasNumbered {
                        for case .workloads(let s) in r.peers where seenPlain.insert(s).inserted { plain.append(s) }
                    }
                    guard d == .egress else { continue }
                    for np in r.ports {
                        guard let name = np.name, let proto = np.proto else { continue }
                        for s in PeerClasses.namedPortSelectors(r.peers) where seenNamed.insert("\(s)|\(name)|\(proto.rawValue)").inserted {
                            named.append((s, name, proto))
                        }
                    }
                }
            }
        }
        // Members of each selector, through a namespace index (most selectors
        // of Kubernetes policies are confined to one namespace).
        let ids = universe.workloads.keys.sorted()
        var byNamespace: [String: [NumericIdentity]] = [:]
        for id in ids { byNamespace[universe.workloads[id]!.namespace, default: []].append(id) }
        var memberCache: [WorkloadSelector: [NumericIdentity]] = [:]
        func membersOf(_ s: WorkloadSelector) -> [NumericIdentity] {
            if let m = memberCache[s] { return m }
            let candidates = s.namespace.map { byNamespace[$0] ?? [] } ?? ids
            let m = candidates.filter { s.matches(universe.workloads[$0]!) }
            memberCache[s] = m
            return m
        }
        var matched: [NumericIdentity: [Int]] = [:]
        func addKey(_ k: Key, _ ms: [NumericIdentity]) {
            let i = keys.count
            keys.append(k)
            keyIndex[k] = i
            for id in ms { matched[id, default: []].append(i) }
        }
        for s in plain { addKey(Key(selector: s), membersOf(s)) }
        for (s, name, proto) in named {
            var byNumber: [UInt16: [NumericIdentity]] = [:]
            for id in membersOf(s) {
                for n in Set(universe.workloads[id]!.ports.filter({ $0.name == name && $0.proto == proto }).map(\.port)) {
                    byNumber[n, default: []].append(id)
                }
            }
            for (n, ms) in byNumber.sorted(by: { $0.key < $1.key }) {
                addKey(Key(selector: s, namedPort: NamedPort(name: name, port: n, proto: proto)), ms)
            }
        }
        // One class per distinct set of keys, numbered in identity order.
        var classByKeys: [[Int]: NumericIdentity] = [:]
        for id in ids {
            guard let ks = matched[id] else { continue }
            let c: NumericIdentity
            if let existing = classByKeys[ks] {
                c = existing
            } else {
                c = NumericIdentity(PAL_CLASS_FIRST + UInt32(classByKeys.count))
                classByKeys[ks] = c
                members[c] = ks
                for k in ks { classesByKey[k, default: []].append(c) }
            }
            classOf[id] = c
        }
    }

    func classes(containing s: WorkloadSelector) -> [NumericIdentity] {
        keyIndex[Key(selector: s)].flatMap { classesByKey[$0] } ?? []
    }

    /// (port number, classes) for an egress named port on selector s.
    func classes(containing s: WorkloadSelector, name: String, proto: IPProtocol) -> [(UInt16, [NumericIdentity])] {
        keys.indices.compactMap { i in
            let k = keys[i]
            guard k.selector == s, let np = k.namedPort, np.name == name, np.proto == proto else { return nil }
            return (np.port, classesByKey[i] ?? [])
        }
    }

    func descriptions() -> [NumericIdentity: [String]] {
        members.mapValues { ks in ks.map { i in
            let k = keys[i]
            return k.selector.summary + (k.namedPort.map { " port \($0)" } ?? "")
        } }
    }
}

/// FQDN classes: a learned address gets the class of the exact set of
/// toFQDNs selectors its names match (an address shared by several names
/// keeps them all); every selector in force also has a class of its own.
struct FQDNClasses {
    let selectors: [FQDNSelector]
    private(set) var classOfSet: [Set<FQDNSelector>: NumericIdentity] = [:]
    private(set) var classOfAddress: [IPAddress: NumericIdentity] = [:]

    init(policies: [Policy], learned: LearnedNames) {
        var seen = Set<FQDNSelector>()
        // (The parser accepts toFQDNs on egress only; a policy built in code
        // may name them as sources too, and is compiled the same way.)
        for p in policies {
            for r in (p.egress ?? []) + (p.ingress ?? []) {
                for case .fqdn(let f) in r.peers { seen.insert(f) }
            }
        }
        selectors = seen.sorted()
        for s in selectors { classOfSet[[s]] = NumericIdentity(NumericIdentity.firstFQDN + UInt32(classOfSet.count)) }
        guard !selectors.isEmpty else { return }
        var setOf: [IPAddress: Set<FQDNSelector>] = [:]
        for (a, names) in learned {
            let matched = FQDNClasses.matching(selectors, names)
            if !matched.isEmpty { setOf[a] = matched }
        }
        // New sets numbered in a stable order (their members, sorted).
        let newSets = Set(setOf.values).filter { classOfSet[$0] == nil }
            .sorted { $0.sorted().map(\.description).joined(separator: "|") < $1.sorted().map(\.description).joined(separator: "|") }
        for s in newSets { classOfSet[s] = NumericIdentity(NumericIdentity.firstFQDN + UInt32(classOfSet.count)) }
        for (a, s) in setOf { classOfAddress[a] = classOfSet[s] }
    }

    static func matching(_ selectors: [FQDNSelector], _ names: Set<String>) -> Set<FQDNSelector> {
        Set(selectors.filter { s in names.contains { s.matches($0) } })
    }

    func classes(containing s: FQDNSelector) -> [NumericIdentity] {
        classOfSet.filter { $0.key.contains(s) }.map(\.value).sorted()
    }
}
