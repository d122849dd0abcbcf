import Foundation
import XCTest

/// The two agents share nothing but an etcd (run in
/// node 1's namespace, reached over the cloud network): they publish
/// themselves and their workloads there and learn each other's.
final class MeshStoreTests: XCTestCase {
    static func startEtcd(_ lab: Lab, dir: String, port: Int) throws -> Process {
        let url = "http://10.200.0.1:\(port)"
        let p = try lab.spawn(netns: lab.nodeNetns(1), ["etcd", "--name", "lab", "--data-dir", dir, "--listen-client-urls", url,
            "--advertise-client-urls", url, "--listen-peer-urls", "http://127.0.0.1:\(port + 1)",
            "--initial-advertise-peer-urls", "http://127.0.0.1:\(port + 1)", "--initial-cluster", "lab=http://127.0.0.1:\(port + 1)"],
            log: "\(dir).log")
        for _ in 0..<100 {
            if try sh(["nsenter", "--net=\(lab.nodeNetns(1))", "curl", "-sf", "--max-time", "1", "\(url)/health"], check: false).output.contains("true") { return p }
            usleep(100_000)
        }
        throw NSError(domain: "etcd", code: 1, userInfo: [NSLocalizedDescriptionKey: "etcd did not start"])
    }

    func ipcacheNames(_ h: AgentHarness) throws -> [String: String] {
        let out = try h.palisade(["maps", "dump", "ipcache", "--output", "json"]).output
        let rows = try JSONDecoder().decode([[String: String]].self, from: Data(out.utf8))
        return Dictionary(rows.map { ($0["prefix"] ?? "", $0["name"] ?? "") }, uniquingKeysWith: { a, _ in a })
    }

    func testWorkloadsLearnedFromEtcdAndEnforcementSurvivesItsLoss() throws {
        try requireKernel()
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/etcd") else {
            if ProcessInfo.processInfo.environment["CI"] == "true" { XCTFail("etcd-server missing") }
            throw XCTSkip("etcd-server missing")
        }
        let lab = try Lab(self, prefix: "pstore1", meshPods: ["1:a", "2:b", "1:c"])
        let etcdDir = NSTemporaryDirectory() + "palisade-lab-etcd-\(getpid())"
        addTeardownBlock { try? FileManager.default.removeItem(atPath: etcdDir); try? FileManager.default.removeItem(atPath: etcdDir + ".log") }
        let port = Int.random(in: 30000...39000)
        var etcd = try Self.startEtcd(lab, dir: etcdDir, port: port)
        let store = "store: {etcd: [\"http://10.200.0.1:\(port)\"]}"
        let (n1, n2) = try storeNodes(lab) { _ in store }
        try n2.start(sharingCAOf: n1, firstEndpoints: 1, endpoints: 1)
        try lab.serve("b", "tcp", port: 8080, address: "::")
        let mesh = MeshTests.Mesh(lab: lab, n1: n1, n2: n2)
        let t = MeshTests.self

        // Each node learned the other and its workloads from etcd alone.
        var ok = false
        for _ in 0..<50 where !ok {
            ok = try t.reach(mesh, from: "a", "10.102.1.2")
            if !ok { usleep(200_000) }
        }
        XCTAssertTrue(ok, "a reaches b through the tunnel, both learned from etcd: \(n1.warnings())\n\(n2.warnings())")

        // Numeric identities are allocated in etcd: both nodes agree.
        func numbers(_ h: AgentHarness) throws -> [String: String] {
            let out = try h.palisade(["maps", "dump", "identities", "--output", "json"]).output
            let rows = try JSONDecoder().decode([[String: String]].self, from: Data(out.utf8))
            return Dictionary(rows.map { ($0["name"] ?? "", $0["identity"] ?? "") }, uniquingKeysWith: { a, _ in a })
        }
        let (i1, i2) = (try numbers(n1), try numbers(n2))
        for id in ["spiffe://test.local/ns/default/sa/a", "spiffe://test.local/ns/default/sa/b"] {
            XCTAssertNotNil(i1[id], "\(i1)")
            XCTAssertEqual(i1[id], i2[id], "\(id) has one number on both nodes")
        }

        // A workload enrolled on node 1 reaches node 2's kernel maps quickly.
        let start = Date()
        _ = try n1.palisade(["workload", "enroll", "--name", "c", "--spiffe-id", "spiffe://test.local/ns/default/sa/c", "--label", "app=c",
                             "--interface", "\(lab.prefix)c", "--cgroup", lab.podCgroup("c"), "--address", "10.101.2.2", "--address", "fd00:101:2::2"])
        var seenAt: Double?
        while Date().timeIntervalSince(start) < 5 && seenAt == nil {
            if try ipcacheNames(n2).contains(where: { $0.key.hasPrefix("10.101.2.2") && $0.value.hasSuffix("/sa/c") }) {
                seenAt = Date().timeIntervalSince(start)
            } else { usleep(50_000) }
        }
        XCTAssertNotNil(seenAt, "c appeared in node 2's ipcache")
        XCTAssertLessThan(seenAt ?? 99, 2.0, "propagation node 1 -> etcd -> node 2 kernel took \(seenAt ?? -1) s")
        print("propagation to the other node's ipcache: \(String(format: "%.2f", seenAt ?? -1)) s")
        XCTAssertFalse(try t.reach(mesh, from: "c", "10.102.1.2"), "c is known everywhere now, and not allowed into b")

        // A policy written once, into etcd from node 1, is enforced on node 2.
        let file = "\(n1.dir)/c-to-b.yaml"
        try policyYAML("c-to-b", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: c}}]
              ports: [{port: 8080}]
        """).write(toFile: file, atomically: true, encoding: .utf8)
        _ = try n1.palisade(["policy", "apply", "--store", file])
        var allowed = false
        let policyStart = Date()
        while !allowed && Date().timeIntervalSince(policyStart) < 5 {
            allowed = try t.reach(mesh, from: "c", "10.102.1.2")
            if !allowed { usleep(100_000) }
        }
        XCTAssertTrue(allowed, "the store's policy admits c into b on node 2")
        _ = try sh(["nsenter", "--net=\(lab.nodeNetns(1))", "curl", "-sf", "-X", "POST", "http://10.200.0.1:\(port)/v3/kv/deleterange",
                    "-d", "{\"key\": \"\(Data("/palisade/policies/c-to-b".utf8).base64EncodedString())\"}"])
        var denied = false
        for _ in 0..<50 where !denied {
            denied = !(try t.reach(mesh, from: "c", "10.102.1.2"))
            if !denied { usleep(100_000) }
        }
        XCTAssertTrue(denied, "deleting it from the store revokes it")

        // etcd gone: enforcement stays as it was, and status says so.
        kill(etcd.processIdentifier, SIGKILL)
        etcd.waitUntilExit()
        XCTAssertTrue(try t.reach(mesh, from: "a", "10.102.1.2"), "traffic keeps flowing on the last known state")
        XCTAssertFalse(try t.reach(mesh, from: "c", "10.102.1.2"), "and denials stay denials")
        var reported = false
        for _ in 0..<50 where !reported {
            let st = try n1.palisade(["status"], check: false)
            reported = st.status != 0 && st.output.contains("UNREACHABLE")
            if !reported { usleep(200_000) }
        }
        XCTAssertTrue(reported, "status reports the store unreachable")

        // etcd back (same data): the agents reconnect and resync.
        etcd = try Self.startEtcd(lab, dir: etcdDir, port: port)
        var back = false
        for _ in 0..<75 where !back {
            back = try n1.palisade(["status"], check: false).output.contains("store:      connected")
            if !back { usleep(200_000) }
        }
        XCTAssertTrue(back, "the agent reconnected to the store")
        // (The resync that follows the reconnection may still be applying
        // when status first says connected; a few tries, not one.)
        var flows = false
        for _ in 0..<3 where !flows { flows = try t.reach(mesh, from: "a", "10.102.1.2") }
        XCTAssertTrue(flows, "traffic flows after the resync")
    }
}

extension XCTestCase {
    /// Agents of nodes n1 (workload a) and n2 (workload b, strict mTLS,
    /// admitting a on TCP 8080) that learn each other from a store only;
    /// `config(node)` adds the store (and trust) settings. Not started.
    func storeNodes(_ lab: Lab, config: (Int) -> String) throws -> (AgentHarness, AgentHarness) {
        let n1 = try AgentHarness(self, lab: lab, extraConfig: """
            nodeName: n1
            \(config(1))
            advertiseAddress: "10.200.0.1:15008"
            workloads:
            \(MeshTests.workload("a", node: 1, index: 1, lab: lab))
            """, node: 1)
        let n2 = try AgentHarness(self, lab: lab, extraConfig: """
            nodeName: n2
            \(config(2))
            advertiseAddress: "10.200.0.2:15008"
            workloads:
            \(MeshTests.workload("b", node: 2, index: 1, lab: lab, extra: ", mtls: strict"))
            """, node: 2)
        try n2.writePolicy("b", policyYAML("b-ingress", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8080}]
        """))
        return (n1, n2)
    }
}
