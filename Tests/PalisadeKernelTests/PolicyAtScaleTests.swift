import Foundation
import XCTest

/// Named ports and policies that cannot be installed, on real packets.
final class PolicyAtScaleTests: XCTestCase {
    /// Named ports resolve on the destination for ingress and on the peer
    /// for egress, and follow the workloads when a port moves or is renamed
    /// while the policy stays the same.
    func testNamedPortsFollowTheWorkloads() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "pn1", pods: ["a", "b", "c"])
        let agent = try AgentHarness(self, lab: lab)
        try agent.enrollPod("a", index: 1, labels: ["app": "a"])
        try agent.enrollPod("b", index: 2, labels: ["app": "b", "tier": "backend"], ports: ["http=8080/tcp"])
        try agent.enrollPod("c", index: 3, labels: ["app": "c", "tier": "backend"], ports: ["http=9090/tcp"])
        // b admits a on its port named http; a may call any backend on the peer's port named http.
        try agent.writePolicy("b", policyYAML("b-in", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: http}]
        """))
        try agent.writePolicy("a", policyYAML("a-out", """
          selector: {labels: {app: a}}
          egress:
            - to: [{labels: {tier: backend}}]
              ports: [{port: http}]
        """))
        try agent.start()
        var applied = try agent.waitApplied(endpoints: 3)
        for port in [8080, 9090] {
            try lab.serve("b", "tcp", port: port)
            try lab.serve("c", "tcp", port: port)
        }
        let b = "10.99.2.2", c = "10.99.3.2"
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", b, 8080), "b's http is 8080 (ingress and egress)")
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "tcp", b, 9090, timeout: 0.5), "9090 is not b's http")
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", c, 9090), "egress resolves on the peer: c's http is 9090")
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "tcp", c, 8080, timeout: 0.5), "8080 is not c's http")
        let dump = try agent.palisade(["maps", "dump", "policy"]).output
        XCTAssertTrue(dump.contains("8080") && dump.contains("9090"), dump)

        // b's http moves to 9090: the same policy now opens 9090 and closes 8080.
        try agent.enrollPod("b", index: 2, labels: ["app": "b", "tier": "backend"], ports: ["http=9090/tcp"])
        applied = try agent.waitApplied(after: applied.policy.generation, endpoints: 3)
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", b, 9090), "b's http moved to 9090")
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "tcp", b, 8080, timeout: 0.5), "8080 closed after the move")

        // c renames its port: nothing of c is named http any more.
        try agent.enrollPod("c", index: 3, labels: ["app": "c", "tier": "backend"], ports: ["web=9090/tcp"])
        try agent.waitApplied(after: applied.policy.generation, endpoints: 3)
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "tcp", c, 9090, timeout: 0.5), "c has no port named http")
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", b, 9090), "b unchanged")
    }

    /// A policy that does not fit is refused: at the first start the
    /// workloads it selects are locked down (never left unenforced) while the
    /// ipcache is written, so callers are judged by identity; later the
    /// policy in force stays, and a workload that only the refused policy
    /// would isolate is locked down. Status and metrics say so.
    func testRefusedPolicyLocksDownAndKeepsThePolicyInForce() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "pq1", pods: ["a", "b", "c"])
        let agent = try AgentHarness(self, lab: lab)
        try agent.enrollPod("a", index: 1, labels: ["app": "a"])
        try agent.enrollPod("b", index: 2, labels: ["app": "b"])
        try agent.enrollPod("c", index: 3, labels: ["app": "c"])
        // 140 CIDR peers x 1,000 ports: 140,000 entries, over one generation's 131,072.
        let cidrs = (0..<140).map { "{cidr: 172.16.\($0).1/32}" }.joined(separator: ", ")
        let ports = (0..<1000).map { "{port: \(20001 + 2 * $0)}" }.joined(separator: ", ")
        func tooBig(_ name: String, selecting app: String) -> String { policyYAML(name, """
          selector: {labels: {app: \(app)}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8080}]
            - from: [\(cidrs)]
              ports: [\(ports)]
        """) }
        try agent.writePolicy("guarded", tooBig("guarded", selecting: "b"))
        try agent.start()
        var state = try agent.waitApplied(endpoints: 3, timeout: 60)
        XCTAssertNotNil(state.policy.notInstalled)
        XCTAssertTrue(state.policy.notInstalled?.contains("exceed the map's capacity") == true, "\(state.policy)")
        XCTAssertEqual(state.policy.lockedDown, ["spiffe://test.local/ns/default/sa/b"])
        try lab.serve("b", "tcp", port: 8080)
        try lab.serve("c", "tcp", port: 8080)
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 8080, timeout: 0.5), "b is locked down, not open")
        // The ipcache is written: a's packets carry its identity (a pod's
        // egress from an address the ipcache does not know is dropped as spoofed).
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "10.99.3.2", 8080), "c is not selected: open, and a is known")
        let ipcache = try agent.palisade(["maps", "dump", "ipcache"]).output
        XCTAssertTrue(ipcache.contains("10.99.1.2/32") && ipcache.contains("sa/a"), ipcache)
        let explain = try agent.palisade(["policy", "explain", "--from", "a", "--to", "b", "--port", "8080"]).output
        XCTAssertTrue(explain.contains("locked down: policy guarded"), explain)
        let status = try agent.palisade(["status"], check: false)
        XCTAssertNotEqual(status.status, 0)
        XCTAssertTrue(status.output.contains("NOT INSTALLED") && status.output.contains("locked down"), status.output)
        let metrics = try sh(["nsenter", "--net=\(lab.node)", "curl", "-sf", "http://127.0.0.1:9654/metrics"]).output
        XCTAssertTrue(metrics.contains("palisade_policy_installed 0"), metrics)
        XCTAssertTrue(metrics.contains("palisade_policy_locked_down_workloads 1"), metrics)

        // A policy that fits replaces it.
        try agent.writePolicy("guarded", policyYAML("guarded", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8080}]
        """))
        state = try agent.waitApplied(after: state.policy.generation, endpoints: 3)
        XCTAssertNil(state.policy.notInstalled)
        XCTAssertNil(state.policy.lockedDown)
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 8080))
        XCTAssertFalse(try lab.reach(from: lab.netns("c"), "tcp", "10.99.2.2", 8080, timeout: 0.5))

        // A too-big policy for c: the set is refused; b keeps the policy in
        // force, c (open under it) is locked down.
        try agent.writePolicy("c-guard", tooBig("c-guard", selecting: "c"))
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline, agent.state()?.policy.lockedDown == nil { usleep(100_000) }
        state = try XCTUnwrap(agent.state())
        XCTAssertNotNil(state.policy.notInstalled)
        XCTAssertEqual(state.policy.lockedDown, ["spiffe://test.local/ns/default/sa/c"])
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 8080), "the policy in force stays for b")
        XCTAssertFalse(try lab.reach(from: lab.netns("c"), "tcp", "10.99.2.2", 8080, timeout: 0.5), "and still denies c")
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "tcp", "10.99.3.2", 8080, timeout: 0.5), "c is locked down")
    }
}
