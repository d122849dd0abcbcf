import Foundation
import XCTest

/// Two nodes, each its own agent, joined by a veth "cloud network"
/// (tools/lab mesh): a and c on node 1, b on node 2 (strict mTLS, admits
/// only a on TCP 8080). Workloads speak plain TCP; the kernel redirects
/// their connections to the agent, which carries them over mTLS.
final class MeshTests: XCTestCase {
    // (@unchecked: traffic threads only read the lab's names and paths.)
    struct Mesh: @unchecked Sendable {
        let lab: Lab
        let n1: AgentHarness
        let n2: AgentHarness
    }

    static func workload(_ name: String, node: Int, index: Int, lab: Lab, extra: String = "") -> String {
        """
          - {name: \(name), spiffeID: "spiffe://test.local/ns/default/sa/\(name)", labels: {app: \(name)}, \
        addresses: ["10.10\(node).\(index).2", "fd00:10\(node):\(index)::2"], interface: \(lab.prefix)\(name), cgroup: "\(lab.podCgroup(name))"\(extra)}
        """
    }

    static func remote(_ name: String, node: Int, index: Int) -> String {
        """
          - {name: \(name), spiffeID: "spiffe://test.local/ns/default/sa/\(name)", labels: {app: \(name)}, \
        addresses: ["10.10\(node).\(index).2", "fd00:10\(node):\(index)::2"], node: n\(node)}
        """
    }

    /// `trust`, when given, is called once the lab exists and returns each
    /// node's trust configuration (an issuer's); otherwise node 2 shares
    /// node 1's CA directory.
    func setUpMesh(_ prefix: String, extraConfig: String = "", trust: ((Lab) throws -> (Int) -> String)? = nil) throws -> Mesh {
        try requireKernel()
        let lab = try Lab(self, prefix: prefix, meshPods: ["1:a", "2:b", "1:c"])
        let trustConfig = try trust?(lab)
        let n1 = try AgentHarness(self, lab: lab, extraConfig: """
            nodeName: n1
            \(extraConfig)
            \(trustConfig?(1) ?? "")
            workloads:
            \(Self.workload("a", node: 1, index: 1, lab: lab))
            \(Self.workload("c", node: 1, index: 2, lab: lab))
            nodes:
              - {name: n2, tunnelAddress: "10.200.0.2:15008", spiffeID: "spiffe://test.local/palisade/node/n2"}
            remoteWorkloads:
            \(Self.remote("b", node: 2, index: 1))
            """, node: 1)
        let n2 = try AgentHarness(self, lab: lab, extraConfig: """
            nodeName: n2
            \(extraConfig)
            \(trustConfig?(2) ?? "")
            workloads:
            \(Self.workload("b", node: 2, index: 1, lab: lab, extra: ", mtls: strict"))
            nodes:
              - {name: n1, tunnelAddress: "10.200.0.1:15008", spiffeID: "spiffe://test.local/palisade/node/n1"}
            remoteWorkloads:
            \(Self.remote("a", node: 1, index: 1))
            \(Self.remote("c", node: 1, index: 2))
            """, node: 2)
        try n2.writePolicy("b", policyYAML("b-ingress", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8080}]
        """))
        if trustConfig != nil {
            try n1.start()
            try n2.start()
            try n1.waitApplied(endpoints: 2)
            try n2.waitApplied(endpoints: 1)
        } else {
            try n2.start(sharingCAOf: n1, firstEndpoints: 2, endpoints: 1)
        }
        try lab.serve("b", "tcp", port: 8080, address: "::")
        return Mesh(lab: lab, n1: n1, n2: n2)
    }

    /// A client in pod `pod` (its namespace and cgroup: the enrolled workload).
    func reach(_ m: Mesh, from pod: String, _ addr: String, _ port: Int = 8080, message: String? = nil, inCgroup: Bool = true) throws -> Bool {
        try Self.reach(m, from: pod, addr, port, message: message, inCgroup: inCgroup)
    }

    static func reach(_ m: Mesh, from pod: String, _ addr: String, _ port: Int = 8080, message: String? = nil, inCgroup: Bool = true) throws -> Bool {
        var env: [String] = []
        if let message { env = ["env", "PROBE_MESSAGE=\(message)"] }
        let command = (["nsenter", "--net=\(m.lab.netns(pod))"] + env + [Paths.python, Paths.probe, "connect", "tcp", addr, "\(port)", "2"])
            .map { "'\($0)'" }.joined(separator: " ")
        let enter = inCgroup ? "echo $$ > '\(m.lab.podCgroup(pod))/cgroup.procs' && " : ""
        return try sh(["sh", "-c", "\(enter)exec \(command)"], check: false).status == 0
    }

    struct Capture: Decodable { var tcp_packets: Int; var ports: [Int]; var tls_records: Int; var needle_seen: Bool }

    func testCrossNodeTrafficIsMutualTLSAndCarriesTheTrueIdentity() throws {
        let m = try setUpMesh("pmesh1")
        let needle = "PALISADE-PLAINTEXT-NEEDLE-\(UUID().uuidString.prefix(8))"
        let log = "\(m.n1.dir)/capture.log"
        let cap = try m.lab.spawn(netns: m.lab.nodeNetns(1), [Paths.python, "\(Paths.repo)/tools/testing/capture.py", "cloud0", "4", needle], log: log)
        for _ in 0..<50 where !((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("ready") { usleep(100_000) }

        XCTAssertTrue(try reach(m, from: "a", "10.102.1.2", message: needle), "a -> b over the tunnel (IPv4)")
        XCTAssertTrue(try reach(m, from: "a", "fd00:102:1::2", message: needle), "a -> b over the tunnel (IPv6)")
        cap.waitUntilExit()
        let line = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").last.map(String.init) ?? ""
        let capture = try JSONDecoder().decode(Capture.self, from: Data(line.utf8))
        XCTAssertFalse(capture.needle_seen, "the plaintext payload never crosses the cloud network")
        XCTAssertGreaterThan(capture.tls_records, 4, "TLS records on the wire")
        XCTAssertEqual(capture.ports, [15008], "only the tunnel port is used between the nodes")

        // Node 2's kernel attributes the delivered connections to a, not to the agent's address.
        let ct = try m.n2.palisade(["maps", "dump", "conntrack", "--output", "json"]).output
        let rows = try JSONDecoder().decode([[String: String]].self, from: Data(ct.utf8))
        let toB = rows.filter { ($0["destination"] ?? "").hasSuffix(":8080") }
        XCTAssertEqual(toB.count, 2, "\(rows)")
        XCTAssertTrue(toB.allSatisfy { $0["peer"] == "spiffe://test.local/ns/default/sa/a" }, "\(toB)")
        let counters = try m.n1.counters()
        XCTAssertEqual(counters["egress/allowed-redirected-to-agent"], 2, "both connections went to the agent")
    }

    func testPolicyByIdentityStrictModeAndSpoofingAcrossNodes() throws {
        let m = try setUpMesh("pmesh2")
        XCTAssertTrue(try reach(m, from: "a", "10.102.1.2"))
        // c is not allowed: the receiving agent refuses its SVID's identity,
        // and the caller sees a reset at once, not a hang.
        let start = Date()
        XCTAssertFalse(try reach(m, from: "c", "10.102.1.2"))
        XCTAssertLessThan(Date().timeIntervalSince(start), 1.5, "a denied connection fails promptly")
        // Plaintext from outside the mesh (a process in a's namespace but not
        // in a's cgroup is not redirected) is dropped by b's strict mode.
        XCTAssertFalse(try reach(m, from: "a", "10.102.1.2", inCgroup: false))
        XCTAssertGreaterThan(try m.n2.counters()["ingress/denied-plaintext-strict-mtls"] ?? 0, 0)
        // c forging a's address is dropped on c's own veth (anti-spoofing),
        // whatever it tries to reach.
        try sh(["ip", "-n", "\(m.lab.prefix)-c", "addr", "add", "10.101.1.2/32", "dev", "eth0"])
        let spoof = try m.lab.reach(from: m.lab.netns("c"), "tcp", "10.102.1.2", 8080, source: "10.101.1.2")
        XCTAssertFalse(spoof)
        XCTAssertGreaterThan(try m.n1.counters()["egress/denied-spoofed-source"] ?? 0, 0)
    }

    func testPeerAgentDownIsAPromptRefusalAndTheTunnelComesBack() throws {
        let m = try setUpMesh("pmesh3")
        XCTAssertTrue(try reach(m, from: "a", "10.102.1.2"))
        m.n2.stop(signal: SIGKILL)
        let start = Date()
        XCTAssertFalse(try reach(m, from: "a", "10.102.1.2"))
        XCTAssertLessThan(Date().timeIntervalSince(start), 1.5, "refused promptly while the peer agent is down")
        try m.n2.start()
        var back = false
        for _ in 0..<50 where !back {
            back = try reach(m, from: "a", "10.102.1.2")
            if !back { usleep(200_000) }
        }
        XCTAssertTrue(back, "the tunnel reconnects once the peer agent is back")
    }

    /// SVIDs rotate at half-life under a long-lived connection and
    /// a stream of new ones; nothing is dropped, and new connections present
    /// the new certificate.
    func testRotationDuringALongLivedStreamDropsNothing() throws {
        let m = try setUpMesh("pmesh4", extraConfig: "svidLifetimeSeconds: 16")
        let serial = { (h: AgentHarness) -> String in
            let out = try h.palisade(["certs", "list", "--output", "json"]).output
            let rows = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]] ?? []
            return rows.first { $0["spiffeID"] as? String == "spiffe://test.local/ns/default/sa/a" }?["serial"] as? String ?? ""
        }
        let before = try serial(m.n1)
        let holdLog = "\(m.n1.dir)/hold.log"
        let hold = try m.lab.spawn(netns: m.lab.netns("a"), cgroup: m.lab.podCgroup("a"),
                                   [Paths.python, Paths.probe, "hold", "10.102.1.2", "8080", "12", "0.05"], log: holdLog)
        var newConnections = 0, failures = 0
        let end = Date().addingTimeInterval(12)
        while Date() < end {
            if try reach(m, from: "a", "10.102.1.2") { newConnections += 1 } else { failures += 1 }
            usleep(300_000)
        }
        hold.waitUntilExit()
        let held = try String(contentsOfFile: holdLog, encoding: .utf8)
        XCTAssertTrue(held.contains("failed=0"), "the long-lived connection lost nothing: \(held)")
        XCTAssertEqual(failures, 0, "no new connection failed across the rotation: \(m.n1.warnings())\n\(m.n2.warnings())")
        XCTAssertGreaterThan(newConnections, 10)
        XCTAssertNotEqual(try serial(m.n1), before, "a's SVID was rotated during the stream")
    }
}

extension MeshTests {
    /// Same node, a -> c: after the handshake the data skips the TCP/IP
    /// stack (sk_msg hands it from socket to socket), yet revoking access
    /// still cuts the established connection.
    func testSameNodeFastPathAndRevocation() throws {
        let m = try setUpMesh("pmesh5")
        try m.lab.serve("c", "tcp", port: 9000, address: "::", cgroup: m.lab.podCgroup("c"))
        let log1 = "\(m.n1.dir)/hold1.log"
        let hold1 = try m.lab.spawn(netns: m.lab.netns("a"), cgroup: m.lab.podCgroup("a"),
                                    [Paths.python, Paths.probe, "hold", "10.101.2.2", "9000", "2", "0.01"], log: log1)
        hold1.waitUntilExit()
        let out1 = try String(contentsOfFile: log1, encoding: .utf8)
        let roundTrips = Int(out1.split(separator: " ").first?.dropFirst(3) ?? "") ?? 0
        XCTAssertTrue(out1.contains("failed=0") && roundTrips > 50, out1)
        let ct = try m.n1.palisade(["maps", "dump", "conntrack", "--output", "json"]).output
        let rows = try JSONDecoder().decode([[String: String]].self, from: Data(ct.utf8)).filter { $0["destination"] == "10.101.2.2:9000" }
        XCTAssertFalse(rows.isEmpty, "the handshake went through the packet programs")
        for r in rows {
            XCTAssertLessThan(Int(r["packets"] ?? "") ?? .max, roundTrips / 4, "data took the fast path, not the packet path: \(r)")
        }

        // Revocation under the fast path: c now admits only b.
        let log2 = "\(m.n1.dir)/hold2.log"
        let hold2 = try m.lab.spawn(netns: m.lab.netns("a"), cgroup: m.lab.podCgroup("a"),
                                    [Paths.python, Paths.probe, "hold", "10.101.2.2", "9000", "6", "0.05"], log: log2)
        sleep(2)
        try m.n1.writePolicy("c", policyYAML("c-from-b", """
          selector: {labels: {app: c}}
          ingress:
            - from: [{labels: {app: b}}]
        """))
        hold2.waitUntilExit()
        let out2 = try String(contentsOfFile: log2, encoding: .utf8)
        XCTAssertTrue(out2.contains("failed=1"), "the revoked connection was cut: \(out2)")
    }
}
