import Foundation
import XCTest

/// Nodes that hold no signing key: an issuer (`palisade ca serve`) in the
/// lab signs CSRs; each node joins it with a one-time token.
extension MeshTests {
    /// Starts an issuer on node 1's cloud address with `registrations`,
    /// makes a join token per node; returns each node's `issuer:` block.
    func startIssuer(_ lab: Lab, registrations: String) throws -> (dir: String, config: (Int) -> String) {
        let dir = NSTemporaryDirectory() + "palisade-issuer-\(lab.prefix)-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        try registrations.write(toFile: "\(dir)/registrations.yaml", atomically: true, encoding: .utf8)
        let serve = try lab.spawn(netns: lab.nodeNetns(1), [Paths.palisade, "ca", "serve", "--state", dir, "--trust-domain", "test.local",
                                                              "--listen", "10.200.0.1:15100"], log: "\(dir)/issuer.log")
        addTeardownBlock { serve.terminate(); serve.waitUntilExit() }
        for _ in 0..<100 where !((try? String(contentsOfFile: "\(dir)/issuer.log", encoding: .utf8)) ?? "").contains("issuer running") { usleep(50_000) }
        let bundle = try sh([Paths.palisade, "ca", "bundle", "--issuer-state", dir]).output
        try bundle.write(toFile: "\(dir)/bundle.pem", atomically: true, encoding: .utf8)
        for node in 1...2 {
            let token = try sh([Paths.palisade, "ca", "join-token", "--state", dir, "--node", "n\(node)", "--ttl", "5m"]).output
            try token.write(toFile: "\(dir)/token-n\(node)", atomically: true, encoding: .utf8)
        }
        return (dir, { node in
            "issuer: {address: \"10.200.0.1:15100\", bundle: \(dir)/bundle.pem, joinTokenFile: \(dir)/token-n\(node)}"
        })
    }

    /// No node holds a CA key; cross-node traffic runs on SVIDs the issuer
    /// signed for keys made on the nodes; a node gets no SVID for an
    /// identity the registrations do not give it; the join token is spent.
    func testNodesHoldNoSigningKeyAndGetOnlyTheirIdentities() throws {
        var issuerDir = ""
        let m = try setUpMesh("ptrust1", trust: { lab in
            let (dir, config) = try self.startIssuer(lab, registrations: """
                apiVersion: palisade.dev/v1
                kind: Registrations
                entries:
                  - nodes: [n1]
                    spiffeIDs: ["spiffe://test.local/ns/default/sa/a"]
                  - nodes: [n2]
                    spiffeIDs: ["spiffe://test.local/ns/default/sa/b"]
                """)
            issuerDir = dir
            return config
        })
        var reached = false
        for _ in 0..<50 where !reached { reached = try reach(m, from: "a", "10.102.1.2"); if !reached { usleep(200_000) } }
        XCTAssertTrue(reached, "a -> b across nodes on issuer-signed SVIDs\n\(m.n1.warnings())")

        for agent in [m.n1, m.n2] {
            let keys = try sh(["find", agent.dir, "-name", "*.key"]).output.split(separator: "\n").map(String.init)
            XCTAssertFalse(FileManager.default.fileExists(atPath: "\(agent.dir)/ca"), "no CA directory on a node")
            XCTAssertTrue(keys.allSatisfy { $0.contains("/svids/") }, "only SVID keys: \(keys)")
        }
        // c runs on n1 but no registration gives n1 its identity.
        let n1Certs = try m.n1.palisade(["certs", "list"]).output
        XCTAssertTrue(n1Certs.contains("spiffe://test.local/ns/default/sa/a") && n1Certs.contains("spiffe://test.local/palisade/node/n1"), n1Certs)
        XCTAssertFalse(n1Certs.contains("sa/c"), n1Certs)
        XCTAssertTrue(m.n1.warnings().contains("svid refused") && m.n1.warnings().contains("sa/c"), m.n1.warnings())
        let issuerLog = (try? String(contentsOfFile: "\(issuerDir)/issuer.log", encoding: .utf8)) ?? ""
        XCTAssertTrue(issuerLog.contains("not-entitled") && issuerLog.contains("node n1 asked for spiffe://test.local/ns/default/sa/c"), issuerLog)
        // The tokens were spent: nothing is left in the issuer's token directory.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: "\(issuerDir)/tokens"), [])

        // a's SVID and key, stolen from node 1, replayed to node 2's tunnel:
        // from node 1's address the stream opens; from anywhere else, 403.
        let stolen = ["\(m.n1.dir)/svids/test.local_ns_default_sa_a.pem", "\(m.n1.dir)/svids/test.local_ns_default_sa_a.key"]
        func replay(from netns: String) throws -> String {
            try sh(["nsenter", "--net=\(netns)", Paths.python, Paths.probe, "tunnelconnect", "10.200.0.2", "15008"] + stolen + ["10.102.1.2:8080"],
                   check: false).output.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        XCTAssertEqual(try replay(from: m.lab.nodeNetns(1)), "200")
        let refused = try replay(from: m.lab.nodeNetns(2))
        XCTAssertTrue(refused.contains("spiffe://test.local/ns/default/sa/a is not registered on the node this tunnel comes from (10.200.0.2)"), refused)
    }
}
