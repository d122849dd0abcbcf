import CPalisadeShared
import Foundation
import PalisadeDatapath
import PalisadeIdentity
import PalisadePolicy
import XCTest

final class PolicyOperationsTests: XCTestCase {
    /// `policy explain` and real packets agree on random flows, IPv4 and
    /// IPv6, TCP and UDP, with allow, deny, CIDR, port ranges and audit.
    func testExplainAgreesWithKernelOnRandomFlows() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "px1", pods: ["a", "b", "c"])
        let agent = try AgentHarness(self, lab: lab)
        for (i, pod) in ["a", "b", "c"].enumerated() { try agent.enrollPod(pod, index: i + 1, labels: ["app": pod]) }
        try agent.writePolicy("b", policyYAML("b-in", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8080}, {port: 9000-9100, protocol: UDP}]
            - from: [{cidr: 10.99.3.0/24}]
            - action: deny
              from: [{cidr: 10.99.3.2/32}]
              ports: [{port: 9090}]
        """))
        try agent.writePolicy("c", policyYAML("c-out", """
          selector: {labels: {app: c}}
          egress:
            - to: [{labels: {app: b}}]
            - to: [{cidr: "fd00:99:1::/64"}]
              ports: [{port: 7000-7999}]
        """))
        try agent.writePolicy("a", policyYAML("a-audit", """
          mode: audit
          selector: {labels: {app: a}}
          ingress:
            - from: [{labels: {app: b}}]
              ports: [{port: 8080}]
        """))
        try agent.start()
        try agent.waitApplied(endpoints: 3)
        for pod in ["a", "b", "c"] {
            for port in [7070, 8080, 9090] { try lab.serve(pod, "tcp", port: port) }
            try lab.serve(pod, "udp", port: 9050)
        }
        var rng = SystemRandomNumberGenerator()
        var disagreements: [String] = []
        var seen: Set<String> = []
        let services = [("tcp", 7070), ("tcp", 8080), ("tcp", 9090), ("udp", 9050)]
        for _ in 0..<28 {
            let pods = ["a", "b", "c"].shuffled(using: &rng)
            let (src, dst) = (pods[0], pods[1])
            let (proto, port) = services.randomElement(using: &rng)!
            let v6 = Bool.random(using: &rng)
            let idx = ["a": 1, "b": 2, "c": 3]
            let srcIP = v6 ? "fd00:99:\(idx[src]!)::2" : "10.99.\(idx[src]!).2"
            let dstIP = v6 ? "fd00:99:\(idx[dst]!)::2" : "10.99.\(idx[dst]!).2"
            let out = try agent.palisade(["policy", "explain", "--from", srcIP, "--to", dstIP, "--port", "\(port)",
                                          "--protocol", proto, "--output", "json"]).output
            let explained = try JSONDecoder().decode([String: AnyDecodable].self, from: Data(out.utf8))["verdict"]?.string
            let actual = try lab.reach(from: lab.netns(src), proto, dstIP, port, timeout: 0.5)
            seen.insert(explained ?? "?")
            if (explained == "allowed") != actual {
                disagreements.append("\(proto) \(srcIP) -> \(dstIP):\(port): explain says \(explained ?? "?"), kernel \(actual ? "passed" : "dropped")\n\(out)")
            }
        }
        XCTAssertEqual(disagreements, [])
        XCTAssertEqual(seen, ["allowed", "denied"], "the random flows should cover both verdicts")

        // The audit policy passed what it would deny, and said so.
        XCTAssertTrue(try lab.reach(from: lab.netns("b"), "tcp", "10.99.1.2", 9090), "audit mode must not drop")
        usleep(300_000)
        XCTAssertTrue(agent.events().contains { $0.verdict == "audit" && $0.reason == "audit-would-deny" && $0.destinationPort == 9090
            && $0.local.hasSuffix("/sa/a") })
        let explain = try agent.palisade(["policy", "explain", "--from", "c", "--to", "b", "--port", "9090"]).output
        XCTAssertTrue(explain.contains("DENIED") && explain.contains("deny rule of policy b-in") && explain.contains("b.yaml:"), explain)
        let defaultDeny = try agent.palisade(["policy", "explain", "--from", "a", "--to", "b", "--port", "7070"]).output
        XCTAssertTrue(defaultDeny.contains("default deny: policy b-in"), defaultDeny)

        // The picture of the same policy.
        let dot = try agent.palisade(["graph", "--denied"]).output
        let ids = try agent.palisade(["maps", "dump", "identities", "--output", "json"]).output
        let rows = try JSONDecoder().decode([[String: String]].self, from: Data(ids.utf8))
        func node(_ pod: String) -> String { "n" + rows.first { $0["name"] == "spiffe://test.local/ns/default/sa/\(pod)" }!["identity"]! }
        XCTAssertTrue(dot.hasPrefix("digraph palisade {"), dot)
        XCTAssertTrue(dot.contains("\(node("a")) -> \(node("b")) [label=\"TCP 8080, UDP 9000-9100\""), dot)
        XCTAssertTrue(dot.contains("color=red"), "denied edges drawn with --denied: \(dot)")
        XCTAssertTrue(dot.contains("default deny: ingress"), dot)
    }

    /// A Kubernetes NetworkPolicy, as written for a cluster, enforced on real packets.
    func testKubernetesNetworkPolicyOnRealPackets() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "px2", pods: ["a", "b", "c"])
        let agent = try AgentHarness(self, lab: lab)
        try agent.enrollPod("a", index: 1, labels: ["app": "client"], namespace: "frontend", namespaceLabels: ["team": "web"])
        try agent.enrollPod("b", index: 2, labels: ["app": "api"], namespace: "backend")
        try agent.enrollPod("c", index: 3, labels: ["app": "batch"], namespace: "backend")
        try agent.writePolicy("netpol", """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: api-from-web
          namespace: backend
        spec:
          podSelector:
            matchLabels: {app: api}
          policyTypes: [Ingress]
          ingress:
          - from:
            - namespaceSelector:
                matchLabels: {team: web}
            ports:
            - protocol: TCP
              port: 8080
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: default-deny-egress
          namespace: backend
        spec:
          podSelector: {}
          policyTypes: [Egress]
        """)
        try agent.start()
        try agent.waitApplied(endpoints: 3)
        for pod in ["a", "b", "c"] { try lab.serve(pod, "tcp", port: 8080); try lab.serve(pod, "tcp", port: 9090) }
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 8080), "frontend (team=web) -> api:8080")
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "fd00:99:2::2", 8080), "and over IPv6")
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 9090, timeout: 0.5), "only port 8080")
        XCTAssertFalse(try lab.reach(from: lab.netns("c"), "tcp", "10.99.2.2", 8080, timeout: 0.5), "backend pods may not egress")
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "10.99.3.2", 9090), "batch is not selected for ingress")
        XCTAssertFalse(try lab.reach(from: lab.netns("b"), "tcp", "10.99.1.2", 8080, timeout: 0.5), "api may not egress either")
    }

    /// An apply that does not fit is refused before anything is written,
    /// and the generation in force stays exactly as it was.
    func testOverCapacityApplyIsRefusedAndChangesNothing() throws {
        try requireKernel()
        let pinRoot = "/sys/fs/bpf/palisade-test-cap-\(getpid())"
        addTeardownBlock { Datapath.removeAll(pinRoot: pinRoot, podIfindexes: []) }
        let dp = try Datapath(pinRoot: pinRoot)
        let w = NumericIdentity(300)
        func compiled(_ n: Int) -> CompiledPolicy {
            let entries = (0..<n).map { i in
                PolicyEntry(local: w, direction: .ingress, peer: NumericIdentity(NumericIdentity.firstCIDR + UInt32(i / 60000)),
                            proto: 6, port: UInt16(i % 60000 + 1), portBits: 16, verdict: .allow, ruleID: 1)
            }
            return CompiledPolicy(entries: entries, defaults: [DefaultEntry(local: w, direction: .ingress, verdict: .deny, ruleID: 1)],
                                  ipcache: [], rules: [], cidrIdentities: [:])
        }
        let good = try dp.apply(compiled(1000))
        XCTAssertThrowsError(try dp.apply(compiled(Datapath.policyCapacity + 1))) { e in
            XCTAssertTrue("\(e)".contains("exceed the map's capacity"), "\(e)")
        }
        XCTAssertEqual(dp.maps.activeConfig.generation, good.generation)
        let slot = UInt8(dp.maps.activeConfig.active_slot)
        let live = try dp.maps.policy.keys()
        XCTAssertEqual(live.count, 1000)
        XCTAssertTrue(live.allSatisfy { $0.generation == slot })

        // Typed iteration: batched where the kernel allows (more entries than one batch), else key by key.
        for i in 0..<10_000 {
            var k = pal_defaults_key(); k.generation = 7; k.local_identity = UInt32(1000 + i)
            var v = pal_defaults_value(); v.verdict = 2; v.rule_id = UInt32(i)
            try dp.maps.defaults.update(k, v)
        }
        XCTAssertNotNil(try dp.maps.defaults.map.entriesBatchRaw())
        XCTAssertEqual(try dp.maps.policy.entries().count, try dp.maps.policy.keys().count)
        let read = try dp.maps.defaults.entries().filter { $0.key.generation == 7 }
        XCTAssertEqual(read.count, 10_000)
        XCTAssertTrue(read.allSatisfy { $0.value.rule_id + 1000 == $0.key.local_identity })
    }
}

/// Just enough JSON decoding for a verdict string.
struct AnyDecodable: Decodable {
    let string: String?
    init(from decoder: Decoder) throws { string = try? decoder.singleValueContainer().decode(String.self) }
}
