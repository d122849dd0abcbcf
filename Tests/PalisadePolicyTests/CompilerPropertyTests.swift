import CPalisadeShared
import XCTest
import PalisadeTestSupport
@testable import PalisadePolicy
import PalisadeIdentity

/// The compiler's map entries, looked up byte for byte the way the kernel's
/// LPM tries and enforce.h combine them, must give the verdict of the
/// straightforward reference evaluator, over many random policies and flows.
final class CompilerPropertyTests: XCTestCase {
    /// A longest-prefix-match trie over raw key bytes, as BPF_MAP_TYPE_LPM_TRIE.
    struct LPM<Value> {
        var entries: [(bits: Int, data: [UInt8], value: Value)] = []
        mutating func insert(bits: Int, data: [UInt8], value: Value) { entries.append((bits, data, value)) }
        func lookup(_ data: [UInt8]) -> Value? {
            var best: (Int, Value)?
            for e in entries where e.bits <= data.count * 8 && prefixEqual(e.data, data, e.bits) {
                if best == nil || e.bits > best!.0 { best = (e.bits, e.value) }
            }
            return best?.1
        }
        func prefixEqual(_ a: [UInt8], _ b: [UInt8], _ bits: Int) -> Bool {
            for i in 0..<(bits / 8) where a[i] != b[i] { return false }
            let rem = bits % 8
            if rem == 0 { return true }
            let mask = UInt8(0xff << (8 - rem) & 0xff)
            return a[bits / 8] & mask == b[bits / 8] & mask
        }
    }

    static func bytes<T>(_ v: T) -> (UInt32, [UInt8]) {
        var v = v
        return withUnsafeBytes(of: &v) { raw in (raw.load(as: UInt32.self), Array(raw.dropFirst(4))) }
    }

    /// The datapath's decision for a new flow, from the generation's entries.
    struct KernelModel {
        var policy = LPM<pal_policy_value>()
        var ipcache = LPM<pal_ipcache_value>()
        var defaults: [String: pal_defaults_value] = [:]
        var peerClass: [UInt32: UInt32] = [:]   // pal_peer_class of the generation
        let slot: UInt8 = 1

        init(_ c: CompiledPolicy) {
            for e in c.entries { let (bits, data) = bytes(e.key(generation: slot)); policy.insert(bits: Int(bits), data: data, value: e.value) }
            for e in c.peerClassEntries { peerClass[e.key(generation: slot).identity] = e.peerClass.rawValue }
            for e in c.ipcache { let (bits, data) = bytes(e.key(generation: slot)); ipcache.insert(bits: Int(bits), data: data, value: e.value) }
            for e in c.defaults { defaults["\(e.local.rawValue)/\(e.direction)"] = e.value }
        }

        func rank(_ v: UInt8) -> Int { Verdict(rawValue: v)!.rank }

        func decide(_ f: Flow) -> Verdict {
            guard let def = defaults["\(f.local.rawValue)/\(f.direction)"] else { return .allow }
            var ik = pal_ipcache_key()
            ik.prefixlen = 136
            ik.generation = slot
            withUnsafeMutableBytes(of: &ik.addr) { for i in 0..<16 { $0[i] = f.peerAddress.bytes[i] } }
            let peer = ipcache.lookup(CompilerPropertyTests.bytes(ik).1) ?? { var v = pal_ipcache_value(); v.identity = 2; v.peer_class = 2; return v }()
            return decide(f, peer: peer, def: def)
        }

        /// A tunnelled flow: the peer is known by identity, its class from pal_peer_class.
        func decide(_ f: Flow, peerIdentity: UInt32) -> Verdict {
            guard let def = defaults["\(f.local.rawValue)/\(f.direction)"] else { return .allow }
            var peer = pal_ipcache_value()
            peer.identity = peerIdentity
            peer.peer_class = NumericIdentity(peerIdentity).isWorkload ? (peerClass[peerIdentity] ?? 0) : peerIdentity
            return decide(f, peer: peer, def: def)
        }

        func decide(_ f: Flow, peer: pal_ipcache_value, def: pal_defaults_value) -> Verdict {
            let port: UInt16 = (f.proto == 6 || f.proto == 17) ? f.port : 0
            func look(_ id: UInt32) -> pal_policy_value? {
                let e = PolicyEntry(local: f.local, direction: f.direction, peer: NumericIdentity(id), proto: f.proto, port: port, portBits: 16, verdict: .none, ruleID: 0)
                return policy.lookup(CompilerPropertyTests.bytes(e.key(generation: slot)).1)
            }
            func may(_ bit: UInt32) -> Bool { def.lookups & UInt8(bit) != 0 }   // as enforce.h skips lookups
            var win = peer.peer_class != 0 && may(PAL_LOOKUP_PEER) ? look(peer.peer_class) : nil
            if peer.cidr_identity != 0, may(PAL_LOOKUP_CIDR), let c = look(peer.cidr_identity), win == nil || rank(c.verdict) > rank(win!.verdict) { win = c }
            if peer.fqdn_class != 0, may(PAL_LOOKUP_FQDN), let c = look(peer.fqdn_class), win == nil || rank(c.verdict) > rank(win!.verdict) { win = c }
            if may(PAL_LOOKUP_ANY), let a = look(0), win == nil || rank(a.verdict) > rank(win!.verdict) { win = a }
            return Verdict(rawValue: win?.verdict ?? def.verdict)!
        }
    }

    // MARK: random policies

    static let cidrPool = ["10.0.0.0/8", "10.0.1.0/24", "10.0.1.0/28", "10.0.2.5/32", "0.0.0.0/0", "192.168.0.0/16", "fd00::/8", "fd00:0:1::/48", "::/0"].map { CIDR($0)! }
    static let portPool: [UInt16] = [22, 53, 79, 80, 81, 443, 1000, 1500, 2000, 2001, 8080, 65535]

    struct World {
        var universe: Universe
        var ids: [NumericIdentity]
        var addresses: [IPAddress]
    }

    func randomWorld(_ r: inout SplitMix64) -> World {
        var workloads: [NumericIdentity: WorkloadIdentity] = [:]
        var addresses: [IPAddress] = []
        for i in 0..<8 {
            let id = NumericIdentity(256 + UInt32(i))
            var addrs = [IPAddress.v4(10, 0, UInt8(i % 3), UInt8(2 + i))]
            if Bool.random(using: &r) { addrs.append(IPAddress("fd00:0:\(i % 2)::\(i + 2)")!) }
            if i == 5 { addrs.append(.v4(192, 168, 7, 7)) }   // split across CIDR boundaries
            // Named ports: the same name on different numbers, some missing.
            var ports: [NamedPort] = []
            if Int.random(in: 0..<4, using: &r) != 0 { ports.append(NamedPort(name: "http", port: [80, 81, 8080].randomElement(using: &r)!)) }
            if Bool.random(using: &r) { ports.append(NamedPort(name: "dns", port: 53, proto: .udp)) }
            if Bool.random(using: &r) { ports.append(NamedPort(name: "http", port: 80, proto: .udp)) }
            workloads[id] = WorkloadIdentity(spiffeID: try! SpiffeID("spiffe://td/ns/ns\(i % 2)/sa/w\(i)"),
                                             labels: ["app": ["a", "b", "c"][i % 3], "tier": ["x", "y"][i % 2]],
                                             namespace: "ns\(i % 2)", addresses: addrs,
                                             isLocal: i < 6,   // 6 and 7 live on another node: peers only
                                             ports: ports)
            addresses += addrs
        }
        let host = [IPAddress.v4(10, 0, 255, 1), IPAddress.v4(127, 0, 0, 1)]
        addresses += host
        addresses += ["10.0.1.7", "10.0.2.5", "10.5.5.5", "8.8.8.8", "192.168.1.1", "fd00::5", "fd00:0:1::99", "2001:db8::1"].map { IPAddress($0)! }
        // What DNS taught: external and in-CIDR addresses, one
        // address shared by names of different selectors.
        let learned: LearnedNames = [IPAddress("8.8.8.8")!: ["api.example.com"], IPAddress("10.5.5.5")!: ["a.b.example.com", "other.org"],
                                     IPAddress("10.0.1.7")!: ["other.org"], IPAddress("192.168.1.1")!: ["API.example.com."],
                                     IPAddress("fd00::5")!: ["x.example.com"]]
        return World(universe: Universe(workloads: workloads, hostAddresses: host, learned: learned), ids: workloads.keys.sorted(), addresses: addresses)
    }

    func randomSelector(_ r: inout SplitMix64) -> WorkloadSelector {
        switch Int.random(in: 0..<5, using: &r) {
        case 0: return WorkloadSelector()
        case 1: return WorkloadSelector(spiffeID: try! SpiffeID("spiffe://td/ns/ns\(Int.random(in: 0...1, using: &r))/sa/w\(Int.random(in: 0..<7, using: &r))"))
        case 2: return WorkloadSelector(spiffeIDPrefix: try! SpiffeID("spiffe://td/ns/ns\(Int.random(in: 0...1, using: &r))"))
        case 3: return WorkloadSelector(labels: LabelSelector(matchLabels: ["app": ["a", "b", "c"].randomElement(using: &r)!]))
        default: return WorkloadSelector(labels: LabelSelector(matchExpressions: [.init(key: "tier", op: [.in, .notIn].randomElement(using: &r)!, values: ["x"])]))
        }
    }

    func randomPeer(_ r: inout SplitMix64) -> Peer {
        switch Int.random(in: 0..<7, using: &r) {
        case 6: return .fqdn([.name("api.example.com"), .pattern("*.example.com"), .name("other.org"), .pattern("*"), .pattern("a.*.example.com")].randomElement(using: &r)!)
        case 0, 1: return .workloads(randomSelector(&r))
        case 2, 3:
            let c = Self.cidrPool.randomElement(using: &r)!
            let inner = Self.cidrPool.filter { c.contains($0) && $0 != c }
            let except = inner.isEmpty || Bool.random(using: &r) ? [] : [inner.randomElement(using: &r)!]
            return .cidr(c, except: except)
        default: return .entity([.host, .world, .all].randomElement(using: &r)!)
        }
    }

    func randomPorts(_ r: inout SplitMix64) -> [PortRule] {
        (0..<Int.random(in: 0...2, using: &r)).map { _ in
            switch Int.random(in: 0..<7, using: &r) {
            case 5: return PortRule(proto: [.tcp, .udp].randomElement(using: &r)!, name: "http")
            case 6: return PortRule(proto: .udp, name: ["dns", "none"].randomElement(using: &r)!)
            case 0: return PortRule(proto: .icmp)
            case 1: return PortRule(proto: nil)
            case 2:
                let a = Self.portPool.randomElement(using: &r)!
                return PortRule(proto: .tcp, first: a, last: min(65535, a &+ UInt16.random(in: 0...1500, using: &r)))
            default: return PortRule(proto: [.tcp, .udp].randomElement(using: &r)!, first: Self.portPool.randomElement(using: &r)!)
            }
        }
    }

    func randomPolicies(_ r: inout SplitMix64) -> PolicySet {
        let loc = SourceLocation(file: "gen.yaml", line: 1)
        return PolicySet(policies: (0..<Int.random(in: 1...4, using: &r)).map { i in
            func rules() -> [Rule]? {
                if Int.random(in: 0..<3, using: &r) == 0 { return nil }
                return (0..<Int.random(in: 0...3, using: &r)).map { _ in
                    Rule(action: Int.random(in: 0..<4, using: &r) == 0 ? .deny : .allow,
                         peers: (0..<Int.random(in: 0...2, using: &r)).map { _ in randomPeer(&r) },
                         ports: randomPorts(&r), location: loc)
                }
            }
            var ing = rules(), eg = rules()
            if ing == nil && eg == nil { ing = [] }
            if Int.random(in: 0..<4, using: &r) == 0 { eg = eg ?? nil }
            return Policy(name: "p\(i)", mode: Int.random(in: 0..<5, using: &r) == 0 ? .audit : .enforce,
                          selector: randomSelector(&r), ingress: ing, egress: eg, location: loc)
        })
    }

    func testCompiledMapsAgreeWithReferenceEvaluator() throws {
        var r = SplitMix64(seed: 0x5eed)
        var checked = 0, enforcedSeen = 0, deniedSeen = 0, auditSeen = 0, tunnelledChecked = 0, namedPortAllowed = 0
        for round in 0..<400 {
            let world = randomWorld(&r)
            let set = randomPolicies(&r)
            let compiled = try PolicyCompiler.compile(set, universe: world.universe)
            let kernel = KernelModel(compiled)
            let reference = ReferenceEvaluator(set: set, universe: world.universe)
            let lookup = CompiledLookup(compiled)
            // Identity -> class agrees with the ipcache's class for every workload address.
            for e in compiled.ipcache where e.identity.isWorkload {
                XCTAssertEqual(e.value.peer_class, compiled.peerClass(of: e.identity)?.rawValue ?? 0, "ipcache class of \(e.cidr)")
            }
            // Only this node's workloads get entries.
            XCTAssertTrue(compiled.entries.allSatisfy { world.universe.workloads[$0.local]!.isLocal })
            XCTAssertTrue(compiled.defaults.allSatisfy { world.universe.workloads[$0.local]!.isLocal })
            for _ in 0..<60 {
                let f = Flow(local: world.ids.randomElement(using: &r)!, direction: Direction.allCases.randomElement(using: &r)!,
                             peerAddress: world.addresses.randomElement(using: &r)!,
                             proto: [6, 17, 1].randomElement(using: &r)!, port: Self.portPool.randomElement(using: &r)!)
                let want = reference.evaluate(f)
                let got = kernel.decide(f)
                if got != want.verdict {
                    XCTFail("round \(round): \(f): kernel model says \(got), reference \(want.verdict)\npolicies: \(set.policies)")
                    return
                }
                XCTAssertEqual(lookup.evaluate(f).verdict, got, "CompiledLookup (explain) disagrees with the kernel model on \(f)")
                // The same workload peer known by identity (tunnelled), its class
                // from pal_peer_class: the same verdict when no CIDR rule is involved.
                let (peerID, cidrID) = lookup.identities(of: f.peerAddress)
                if peerID.isWorkload, cidrID == nil {
                    XCTAssertEqual(kernel.decide(f, peerIdentity: peerID.rawValue), got, "tunnelled peer \(peerID) on \(f)")
                    tunnelledChecked += 1
                }
                checked += 1
                if want.enforced { enforcedSeen += 1 }
                if want.verdict == .deny { deniedSeen += 1 }
                if want.verdict == .audit { auditSeen += 1 }
                if want.verdict == .allow, want.enforced, let rule = compiled.rule(want.ruleID),
                   let p = set.policies.first(where: { $0.name == rule.policy }),
                   p.rules(rule.direction)?.first(where: { $0.location == rule.location && $0.ports.contains { $0.name != nil } }) != nil {
                    namedPortAllowed += 1
                }
            }
        }
        // The generator must exercise every outcome, or the property proves little.
        XCTAssertGreaterThan(enforcedSeen, checked / 4)
        XCTAssertGreaterThan(deniedSeen, checked / 10)
        XCTAssertGreaterThan(auditSeen, 50)
        XCTAssertGreaterThan(tunnelledChecked, checked / 10)
        print("checked \(checked) flows, \(tunnelledChecked) also as tunnelled, \(namedPortAllowed) allowed by rules with named ports")
    }

    func testTenThousandRulesCompileQuickly() throws {
        var workloads: [NumericIdentity: WorkloadIdentity] = [:]
        for i in 0..<100 {
            workloads[NumericIdentity(256 + UInt32(i))] = WorkloadIdentity(spiffeID: try SpiffeID("spiffe://td/w\(i)"), labels: ["app": "w\(i)"],
                                                                          addresses: [.v4(10, 1, UInt8(i / 200), UInt8(i % 200 + 1))])
        }
        let loc = SourceLocation(file: "big.yaml", line: 1)
        let rules = (0..<10_000).map { i in
            Rule(action: .allow, peers: [.workloads(WorkloadSelector(labels: LabelSelector(matchLabels: ["app": "w\(i % 100)"])))],
                 ports: [PortRule(proto: .tcp, first: UInt16(1000 + i / 100))], location: loc)
        }
        let set = PolicySet(policies: [Policy(name: "big", selector: WorkloadSelector(labels: LabelSelector(matchLabels: ["app": "w0"])),
                                              ingress: rules, egress: nil, location: loc)])
        var start = Date()
        let compiled = try PolicyCompiler.compile(set, universe: Universe(workloads: workloads, hostAddresses: []))
        XCTAssertEqual(compiled.entries.count, 10_000)
        print("compiled 10,000 label rules in \(Int(Date().timeIntervalSince(start) * 1000)) ms")

        // 10,000 CIDR rules: one CIDR identity each, plus the ipcache.
        let cidrRules = (0..<10_000).map { i in
            Rule(action: .allow, peers: [.cidr(CIDR("172.\(16 + i / 65536).\(i / 256 % 256).\(i % 256)/32")!, except: [])],
                 ports: [PortRule(proto: .tcp, first: 8080)], location: loc)
        }
        let cidrSet = PolicySet(policies: [Policy(name: "cidrs", selector: WorkloadSelector(labels: LabelSelector(matchLabels: ["app": "w0"])),
                                                  ingress: cidrRules, egress: nil, location: loc)])
        start = Date()
        let c2 = try PolicyCompiler.compile(cidrSet, universe: Universe(workloads: workloads, hostAddresses: []))
        print("compiled 10,000 CIDR rules in \(Int(Date().timeIntervalSince(start) * 1000)) ms")
        XCTAssertEqual(c2.entries.count, 10_000)
        XCTAssertEqual(c2.ipcache.count, 10_100)
        XCTAssertTrue(c2.ipcache.filter { $0.identity == .world }.allSatisfy { $0.cidrIdentity != nil })
    }
}
