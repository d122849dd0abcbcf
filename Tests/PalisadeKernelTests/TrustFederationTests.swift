import Foundation
import XCTest

/// Four nodes, two trust domains federated through one etcd with
/// authentication on (a user per node), each domain with its own issuer
/// that reads the store: test.local (n1: a, n2: b; issuer on n1) and
/// other.local (n3: x, n4: w; issuer on n3). No node holds a signing key.
/// test.local's root is rotated while traffic crosses both domains.
extension MeshTests {
    func testRootRotationAcrossFederatedTrustDomainsDropsNothing() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "ptrust6", meshPods: ["1:a", "2:b", "3:x", "4:w"])
        var store: AuthenticatedStore!
        let (issuer, testLocal) = try startIssuer(lab, registrations: Self.registrationsAB) { dir in
            store = try self.authenticatedStore(lab, dir: dir, nodes: [1, 2, 3, 4])
            return ["--config", store.operatorConfig]
        }
        let (otherIssuer, otherLocal) = try startIssuer(lab, registrations: """
            apiVersion: palisade.dev/v1
            kind: Registrations
            entries:
              - nodes: [n3]
                spiffeIDs: ["spiffe://other.local/ns/default/sa/x"]
              - nodes: [n4]
                spiffeIDs: ["spiffe://other.local/ns/default/sa/w"]
            """, trustDomain: "other.local", on: 3, joining: [3, 4]) { _ in ["--config", store.operatorConfig] }

        let pods = [1: ("a", "test.local"), 2: ("b", "test.local"), 3: ("x", "other.local"), 4: ("w", "other.local")]
        var agents: [Int: AgentHarness] = [:]
        for n in 1...4 {
            let (pod, td) = pods[n]!
            agents[n] = try AgentHarness(self, lab: lab, extraConfig: """
                nodeName: n\(n)
                trustDomain: \(td)
                \(store.config(n))
                advertiseAddress: "10.200.0.\(n):15008"
                \(td == "test.local" ? testLocal(n) : otherLocal(n))
                workloads:
                  - {name: \(pod), spiffeID: "spiffe://\(td)/ns/default/sa/\(pod)", labels: {app: \(pod)}, addresses: ["10.10\(n).1.2"], \
                interface: \(lab.prefix)\(pod), cgroup: "\(lab.podCgroup(pod))"}
                """, node: n)
            let path = agents[n]!.configPath
            let text = try String(contentsOfFile: path, encoding: .utf8)
            try text.replacingOccurrences(of: "trustDomain: test.local\n", with: "", options: [], range: text.range(of: "trustDomain: test.local\n"))
                .write(toFile: path, atomically: true, encoding: .utf8)
        }
        // b admits a (same domain) and x (federated); w admits a.
        try agents[2]!.writePolicy("b", policyYAML("b-ingress", "  selector: {labels: {app: b}}\n  ingress:\n    - from: [{labels: {app: a}}, {labels: {app: x}}]\n      ports: [{port: 8080}]\n"))
        try agents[4]!.writePolicy("w", policyYAML("w-ingress", "  selector: {labels: {app: w}}\n  ingress:\n    - from: [{labels: {app: a}}]\n      ports: [{port: 8080}]\n"))
        for n in 1...4 { try agents[n]!.start() }
        try lab.serve("b", "tcp", port: 8080, address: "0.0.0.0")
        try lab.serve("w", "tcp", port: 8080, address: "0.0.0.0")

        let m = Mesh(lab: lab, n1: agents[1]!, n2: agents[2]!)
        let paths = [("a", "10.102.1.2"), ("x", "10.102.1.2"), ("a", "10.104.1.2")]
        for (pod, address) in paths {
            var ok = false
            for _ in 0..<100 where !ok { ok = try MeshTests.reach(m, from: pod, address); if !ok { usleep(250_000) } }
            XCTAssertTrue(ok, "\(pod) -> \(address) before the rotation\n\((1...4).map { agents[$0]!.warnings() })\n\(issuer.log)\n\(otherIssuer.log)")
        }
        XCTAssertFalse(try MeshTests.reach(m, from: "x", "10.104.1.2"), "w does not admit x")
        for n in 1...4 {
            XCTAssertFalse(FileManager.default.fileExists(atPath: "\(agents[n]!.dir)/ca"), "no CA directory on n\(n)")
            XCTAssertFalse(agents[n]!.warnings().contains("permission denied"), agents[n]!.warnings())
        }
        XCTAssertTrue(otherIssuer.log.contains("bundle published"), otherIssuer.log)

        final class Traffic: @unchecked Sendable { let lock = NSLock(); var ok = 0; var failed: [String] = []; var done = false }
        let traffic = Traffic()
        let client = Thread {
            while !traffic.lock.withLock({ traffic.done }) {
                for (pod, address) in paths {
                    let good = (try? MeshTests.reach(m, from: pod, address)) ?? false
                    traffic.lock.withLock { if good { traffic.ok += 1 } else { traffic.failed.append("\(pod)->\(address) at \(Date())") } }
                }
                usleep(100_000)
            }
        }
        client.start()
        let rotate = issuer.rotate, until = { (step: String) in try issuer.rotateWhenReady(step) }
        func status() -> String { issuer.caStatus }
        let started = Date()
        XCTAssertTrue(try rotate("prepare").output.contains("prepared"))
        let switched = try until("switch")
        XCTAssertTrue(switched.contains("switched"), switched)
        // The switch waited for the federated nodes too: they trust both roots.
        let during = status()
        for node in ["n3@other.local", "n4@other.local"] {
            XCTAssertTrue(during.split(separator: "\n").contains { $0.hasPrefix(node) && $0.contains("root+new root") }, during)
        }
        XCTAssertTrue(try until("finish").contains("finished"))
        let rotated = Date().timeIntervalSince(started)
        // The old root leaves every bundle (the store's too): traffic goes on.
        usleep(12_000_000)
        traffic.lock.withLock { traffic.done = true }
        while client.isExecuting { usleep(50_000) }
        let (ok, failed) = traffic.lock.withLock { (traffic.ok, traffic.failed) }
        XCTAssertEqual(failed, [], "\(failed.count) of \(ok + failed.count) connections failed\n\((1...4).map { agents[$0]!.logTail() })")
        XCTAssertGreaterThan(ok, 60)
        let after = status()
        XCTAssertTrue(after.contains("phase:      idle"), after)
        for node in ["n3@other.local", "n4@other.local"] {
            XCTAssertTrue(after.split(separator: "\n").contains { $0.hasPrefix(node) && $0.contains(" root ") && !$0.contains("+") },
                          "federated nodes dropped the old root\n\(after)")
        }
        // The issuer's metrics (loopback of its node) saw the rotation.
        let metrics = try sh(["nsenter", "--net=\(lab.nodeNetns(1))", "curl", "-sf", "http://127.0.0.1:15101/metrics"]).output
        for line in ["palisade_issuer_rotation_phase{phase=\"idle\"} 1", "palisade_issuer_rotation_generation 1", "palisade_issuer_store_connected 1",
                     "palisade_issuer_rotation_nodes{state=\"reporting\"} 4"] {
            XCTAssertTrue(metrics.contains(line), "\(line)\n\(metrics)")
        }
        // A federated node down during the next rotation holds the switch
        // up (its record in the store still trusts the old root only), then
        // catches up from the store when it is back.
        agents[4]!.stop()
        XCTAssertTrue(try rotate("prepare").output.contains("prepared"))
        usleep(12_000_000)
        let held = try rotate("switch")
        XCTAssertEqual(held.status, 1)
        XCTAssertTrue(held.output.contains("not every node trusts the new root yet: n4@other.local"), held.output)
        try agents[4]!.start()
        XCTAssertTrue(try until("switch").contains("switched"))
        XCTAssertTrue(try until("finish").contains("finished"))
        var back = false
        for _ in 0..<60 where !back { back = try MeshTests.reach(m, from: "a", "10.104.1.2"); if !back { usleep(250_000) } }
        XCTAssertTrue(back, "a reaches w after the second rotation\n\(agents[4]!.logTail())")
        print("rotation across two federated trust domains: \(ok) connections on 3 paths, 0 failed; prepare to finish in \(String(format: "%.1f", rotated)) s")
    }
}
