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

    /// The whole setup with no shared secret: an issuer signs CSRs, etcd
    /// has authentication on with a role per node (`palisade store
    /// enable-auth` / `grant-node`), nodes learn each other from etcd only.
    /// Traffic flows; a node's etcd credentials cannot write policies.
    func testIssuerAndAuthenticatedStoreWithNothingShared() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "ptrust2", meshPods: ["1:a", "2:b"])
        let (issuerDir, issuer) = try startIssuer(lab, registrations: """
            apiVersion: palisade.dev/v1
            kind: Registrations
            entries:
              - nodes: [n1]
                spiffeIDs: ["spiffe://test.local/ns/default/sa/a"]
              - nodes: [n2]
                spiffeIDs: ["spiffe://test.local/ns/default/sa/b"]
            """)
        let etcdDir = "\(issuerDir)/etcd"
        let port = Int.random(in: 30000...39000)
        let etcd = try MeshStoreTests.startEtcd(lab, dir: etcdDir, port: port)
        addTeardownBlock { etcd.terminate(); etcd.waitUntilExit() }
        let url = "http://10.200.0.1:\(port)"
        func secret(_ name: String, _ text: String) throws -> String {
            let path = "\(issuerDir)/\(name)"
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            chmod(path, 0o600)
            return path
        }
        // The operator: root turns authentication on, then makes each node's user.
        let rootPassword = try secret("root-password", "root-\(UUID().uuidString)")
        let anonymous = try secret("operator-anonymous.yaml", "tunnelAddress: off\nstore: {etcd: [\"\(url)\"]}\n")
        let operatorConfig = try secret("operator.yaml", "tunnelAddress: off\nstore: {etcd: [\"\(url)\"], user: root, passwordFile: \(rootPassword)}\n")
        func cli(_ args: [String], check: Bool = true) throws -> (status: Int32, output: String) {
            try sh(["nsenter", "--net=\(lab.nodeNetns(1))", Paths.palisade] + args, check: check)
        }
        _ = try cli(["store", "enable-auth", "--root-password-file", rootPassword, "--config", anonymous])
        var store: [Int: String] = [:]
        for node in 1...2 {
            let password = try cli(["store", "grant-node", "--node", "n\(node)", "--config", operatorConfig]).output
            let file = try secret("n\(node)-password", password)
            store[node] = "store: {etcd: [\"\(url)\"], user: palisade-node-n\(node), passwordFile: \(file)}"
        }
        let n1 = try AgentHarness(self, lab: lab, extraConfig: """
            nodeName: n1
            \(store[1]!)
            \(issuer(1))
            advertiseAddress: "10.200.0.1:15008"
            workloads:
            \(MeshTests.workload("a", node: 1, index: 1, lab: lab))
            """, node: 1)
        let n2 = try AgentHarness(self, lab: lab, extraConfig: """
            nodeName: n2
            \(store[2]!)
            \(issuer(2))
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
        try n1.start()
        try n2.start()
        try lab.serve("b", "tcp", port: 8080, address: "::")
        let mesh = MeshTests.Mesh(lab: lab, n1: n1, n2: n2)
        var ok = false
        for _ in 0..<75 where !ok {
            ok = try MeshTests.reach(mesh, from: "a", "10.102.1.2")
            if !ok { usleep(200_000) }
        }
        XCTAssertTrue(ok, "a reaches b: nodes learned each other from etcd, SVIDs from the issuer\n\(n1.warnings())\n\(n2.warnings())")
        XCTAssertFalse((n1.warnings() + n2.warnings()).contains("permission denied"), n1.warnings() + n2.warnings())
        for agent in [n1, n2] { XCTAssertFalse(FileManager.default.fileExists(atPath: "\(agent.dir)/ca")) }

        // A node's etcd user cannot write a policy (nor anything not its own).
        let policy = "\(issuerDir)/open.yaml"
        try policyYAML("open-everything", "  selector: {labels: {app: b}}\n  ingress:\n    - from: [{cidr: 0.0.0.0/0}]\n")
            .write(toFile: policy, atomically: true, encoding: .utf8)
        let refused = try n1.palisade(["policy", "apply", "--store", policy], check: false)
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.output.contains("permission denied"), refused.output)
        let applied = try cli(["policy", "apply", "--store", policy, "--config", operatorConfig], check: false)
        XCTAssertEqual(applied.status, 0, applied.output)
    }
}
