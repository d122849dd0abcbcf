import Foundation
import XCTest

/// Real programs, real packets, in namespaces each test creates.
final class EnforcementTests: XCTestCase {
    func testPodTCPIngressEgressAndReplies() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "pk1", pods: ["a", "b", "c"])
        let agent = try AgentHarness(self, lab: lab)
        try agent.enrollPod("a", index: 1, labels: ["app": "a"])
        try agent.enrollPod("b", index: 2, labels: ["app": "b"])
        try agent.enrollPod("c", index: 3, labels: ["app": "c"])
        try agent.writePolicy("b", policyYAML("b-ingress", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8080}]
        """))
        try agent.writePolicy("a", policyYAML("a-isolated", """
          selector: {spiffeID: "spiffe://test.local/ns/default/sa/a"}
          ingress: []
          egress:
            - to: [{spiffeIDPrefix: "spiffe://test.local/ns/default/sa/b"}]
        """))
        try agent.start()
        try agent.waitApplied(endpoints: 3)
        for pod in ["a", "b", "c"] { for port in [8080, 9090] { try lab.serve(pod, "tcp", port: port) } }

        let a = lab.netns("a"), b = lab.netns("b"), c = lab.netns("c")
        XCTAssertTrue(try lab.reach(from: a, "tcp", "10.99.2.2", 8080), "a -> b:8080 is allowed both ways; replies must pass a's isolated ingress")
        if !(try lab.reach(from: a, "tcp", "fd00:99:2::2", 8080)) {
            XCTFail("a -> b:8080 over IPv6. events: \(agent.events()) counters: \(try agent.counters().filter { $0.value > 0 })")
        }
        XCTAssertFalse(try lab.reach(from: a, "tcp", "10.99.2.2", 9090), "b's ingress allows only 8080")
        XCTAssertFalse(try lab.reach(from: a, "tcp", "10.99.3.2", 8080), "a's egress allows only b")
        XCTAssertFalse(try lab.reach(from: b, "tcp", "10.99.1.2", 8080), "reverse direction: a's ingress is isolated")
        XCTAssertFalse(try lab.reach(from: c, "tcp", "10.99.2.2", 8080), "b admits only a")
        XCTAssertTrue(try lab.reach(from: c, "tcp", "10.99.2.2", 9090) == false)
        XCTAssertTrue(try lab.reach(from: b, "tcp", "10.99.3.2", 8080), "c is not selected by any policy: unrestricted")

        // Deny events name the identities involved.
        usleep(300_000)
        let events = agent.events()
        XCTAssertTrue(events.contains { $0.direction == "ingress" && $0.destination == "10.99.2.2" && $0.destinationPort == 9090
            && $0.local == "spiffe://test.local/ns/default/sa/b" && $0.peer == "spiffe://test.local/ns/default/sa/a" && $0.reason == "denied-default" },
                      "events: \(events)")
        XCTAssertTrue(events.contains { $0.direction == "egress" && $0.destination == "10.99.3.2" && $0.local.hasSuffix("/sa/a") })
        XCTAssertTrue(events.contains { $0.direction == "ingress" && $0.source == "10.99.2.2" && $0.local.hasSuffix("/sa/a") })

        // The map dump shows the rule with its file and line.
        let dump = try agent.palisade(["maps", "dump", "policy"]).output
        XCTAssertTrue(dump.contains("b-ingress allow b.yaml:8"), dump)
    }

    func testUDPCIDRDenyWinsAndExactCounters() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "pk2", pods: ["a", "b"])
        let agent = try AgentHarness(self, lab: lab)
        try agent.enrollPod("a", index: 1, labels: ["app": "a"])
        try agent.enrollPod("b", index: 2, labels: ["app": "b"])
        try agent.writePolicy("b", policyYAML("b-udp", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{cidr: 10.99.1.0/24}]
              ports: [{port: 5353, protocol: UDP}, {port: 5354, protocol: UDP}]
            - action: deny
              from: [{cidr: 10.99.1.2/32}]
              ports: [{port: 5354, protocol: UDP}]
        """))
        try agent.start()
        try agent.waitApplied(endpoints: 2)
        for port in [5353, 5354, 5355] { try lab.serve("b", "udp", port: port) }
        let a = lab.netns("a")
        XCTAssertTrue(try lab.reach(from: a, "udp", "10.99.2.2", 5353), "allowed by CIDR")
        XCTAssertFalse(try lab.reach(from: a, "udp", "10.99.2.2", 5354, timeout: 0.5), "the deny rule wins over the allow")
        XCTAssertFalse(try lab.reach(from: a, "udp", "fd00:99:2::2", 5353, timeout: 0.5), "a's IPv6 address is outside the IPv4 CIDR")

        // Exactly N denied datagrams: N drops counted, N events.
        let before = try agent.counters()
        let allEventsBefore = agent.events().count
        let eventsBefore = agent.events().filter { $0.destinationPort == 5355 }.count
        for _ in 0..<5 { XCTAssertFalse(try lab.reach(from: a, "udp", "10.99.2.2", 5355, timeout: 0.3)) }
        usleep(300_000)
        let after = try agent.counters()
        XCTAssertEqual(after["ingress/denied-default"]! - before["ingress/denied-default"]!, 5, "events: \(agent.events().dropFirst(allEventsBefore))")
        XCTAssertEqual(agent.events().filter { $0.destinationPort == 5355 && $0.proto == "UDP" && $0.verdict == "denied" }.count - eventsBefore, 5)
    }

    func testCgroupWorkloadEgressAndIngress() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "pk3", pods: ["a", "b"])
        let agent = try AgentHarness(self, lab: lab)
        let cg = try lab.makeCgroup("batch")
        try agent.enrollPod("a", index: 1, labels: ["app": "a"])
        try agent.enrollPod("b", index: 2, labels: ["app": "b"])
        try agent.enrollCgroup("batch", path: cg, labels: ["app": "batch"])
        try agent.writePolicy("batch", policyYAML("batch", """
          selector: {labels: {app: batch}}
          egress:
            - to: [{labels: {app: b}}]
              ports: [{port: 8080}]
          ingress:
            - from: [{labels: {app: a}}]
        """))
        try agent.start()
        try agent.waitApplied(endpoints: 3)
        try lab.serve("b", "tcp", port: 8080)
        try lab.serve("b", "tcp", port: 9090)
        try lab.serve("node", "tcp", port: 7070, cgroup: cg, netns: lab.node)

        XCTAssertTrue(try lab.reach(from: lab.node, "tcp", "10.99.2.2", 8080, cgroup: cg), "batch -> b:8080 allowed")
        XCTAssertFalse(try lab.reach(from: lab.node, "tcp", "10.99.2.2", 9090, cgroup: cg), "batch -> b:9090 denied at the cgroup's egress")
        XCTAssertTrue(try lab.reach(from: lab.node, "tcp", "10.99.2.2", 9090), "the node outside the cgroup is not restricted")
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "10.99.1.1", 7070), "a -> batch allowed")
        XCTAssertFalse(try lab.reach(from: lab.netns("b"), "tcp", "10.99.2.1", 7070), "b -> batch denied at the cgroup's ingress")
    }

    func testSpoofedSourceIsDropped() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "pk4", pods: ["a", "b", "c"])
        let agent = try AgentHarness(self, lab: lab)
        try agent.enrollPod("a", index: 1, labels: ["app": "a"])
        try agent.enrollPod("b", index: 2, labels: ["app": "b"])
        try agent.enrollPod("c", index: 3, labels: ["app": "c"])
        try agent.writePolicy("c", policyYAML("c-from-b", """
          selector: {labels: {app: c}}
          ingress:
            - from: [{labels: {app: b}}]
        """))
        try agent.start()
        try agent.waitApplied(endpoints: 3)
        try lab.serve("c", "udp", port: 4000)
        XCTAssertTrue(try lab.reach(from: lab.netns("b"), "udp", "10.99.3.2", 4000))
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "udp", "10.99.3.2", 4000, timeout: 0.5))
        // a claims b's address: the datapath must not take it for b.
        try sh(["ip", "-n", "\(lab.prefix)-a", "addr", "add", "10.99.2.2/32", "dev", "eth0"])
        let before = try agent.counters()["egress/denied-spoofed-source"] ?? 0
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "udp", "10.99.3.2", 4000, timeout: 0.5, source: "10.99.2.2"))
        XCTAssertGreaterThan(try agent.counters()["egress/denied-spoofed-source"] ?? 0, before)
    }
}
