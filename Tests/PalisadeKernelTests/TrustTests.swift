import Foundation
import XCTest

/// Nodes that hold no signing key: an issuer (`palisade ca serve`) in the
/// lab signs CSRs; each node joins it with a one-time token.
extension MeshTests {
    /// An issuer process on a node's cloud address (10.200.0.N:15100).
    final class IssuerProcess {
        let lab: Lab
        let dir: String
        let trustDomain: String
        let node: Int
        /// More `ca serve` arguments (e.g. --config with the operator's store).
        var arguments: [String] = []
        var process: Process?
        init(lab: Lab, dir: String, trustDomain: String = "test.local", node: Int = 1) {
            self.lab = lab; self.dir = dir; self.trustDomain = trustDomain; self.node = node
        }
        var address: String { "10.200.0.\(node):15100" }

        func start() throws {
            let log = "\(dir)/issuer-\(Date().timeIntervalSince1970).log"
            process = try lab.spawn(netns: lab.nodeNetns(node), [Paths.palisade, "ca", "serve", "--state", dir, "--trust-domain", trustDomain,
                                                                 "--listen", address] + arguments, log: log)
            for _ in 0..<100 where !((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("issuer running") { usleep(50_000) }
        }

        func stop() {
            guard let p = process, p.isRunning else { return }
            p.terminate()
            p.waitUntilExit()
            process = nil
        }

        /// `palisade ca rotate STEP` on this issuer's state.
        func rotate(_ step: String) throws -> (status: Int32, output: String) {
            try sh([Paths.palisade, "ca", "rotate", "--state", dir, step], check: false)
        }

        /// `palisade ca status`.
        var caStatus: String { (try? sh([Paths.palisade, "ca", "status", "--state", dir]).output) ?? "" }

        /// Runs `step` until it succeeds (nodes learn within their 10 s
        /// probe, federated ones through the store); fails the test if it never does.
        func rotateWhenReady(_ step: String, within seconds: Double = 40) throws -> String {
            let start = Date()
            var last = (status: Int32(1), output: "")
            while Date().timeIntervalSince(start) < seconds {
                last = try rotate(step)
                if last.status == 0 { return last.output }
                usleep(1_000_000)
            }
            XCTFail("\(step) never became possible: \(last.output)\n\(caStatus)")
            return last.output
        }

        /// Everything the issuer logged, across restarts.
        var log: String {
            ((try? FileManager.default.contentsOfDirectory(atPath: dir))?.filter { $0.hasPrefix("issuer-") }.sorted() ?? [])
                .compactMap { try? String(contentsOfFile: "\(dir)/\($0)", encoding: .utf8) }.joined(separator: "\n")
        }
    }

    /// Starts an issuer with `registrations` and makes a join token per
    /// node; returns it and each node's `issuer:` block.
    func startIssuer(_ lab: Lab, registrations: String, trustDomain: String = "test.local", on node: Int = 1, joining nodes: [Int] = [1, 2],
                     arguments: (String) throws -> [String] = { _ in [] }) throws -> (issuer: IssuerProcess, config: (Int) -> String) {
        let dir = NSTemporaryDirectory() + "palisade-issuer-\(lab.prefix)-\(trustDomain)-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        try registrations.write(toFile: "\(dir)/registrations.yaml", atomically: true, encoding: .utf8)
        let issuer = IssuerProcess(lab: lab, dir: dir, trustDomain: trustDomain, node: node)
        issuer.arguments = try arguments(dir)
        addTeardownBlock { issuer.stop() }
        try issuer.start()
        let bundle = try sh([Paths.palisade, "ca", "bundle", "--issuer-state", dir]).output
        try bundle.write(toFile: "\(dir)/bundle.pem", atomically: true, encoding: .utf8)
        for node in nodes {
            let token = try sh([Paths.palisade, "ca", "join-token", "--state", dir, "--node", "n\(node)", "--ttl", "5m"]).output
            try token.write(toFile: "\(dir)/token-n\(node)", atomically: true, encoding: .utf8)
        }
        let address = issuer.address
        return (issuer, { node in
            "issuer: {address: \"\(address)\", bundle: \(dir)/bundle.pem, joinTokenFile: \(dir)/token-n\(node)}"
        })
    }

    /// The two-node mesh (a, c on n1; b on n2) with an issuer that gives
    /// n1 the identity a and n2 the identity b (not c).
    func setUpMeshWithIssuer(_ prefix: String, extraConfig: String = "") throws -> (Mesh, IssuerProcess) {
        var issuer: IssuerProcess!
        let m = try setUpMesh(prefix, extraConfig: extraConfig, trust: { lab in
            let (started, config) = try self.startIssuer(lab, registrations: Self.registrationsAB)
            issuer = started
            return config
        })
        return (m, issuer)
    }

    static let registrationsAB = """
        apiVersion: palisade.dev/v1
        kind: Registrations
        entries:
          - nodes: [n1]
            spiffeIDs: ["spiffe://test.local/ns/default/sa/a"]
          - nodes: [n2]
            spiffeIDs: ["spiffe://test.local/ns/default/sa/b"]
        """

    /// No node holds a CA key; cross-node traffic runs on SVIDs the issuer
    /// signed for keys made on the nodes; a node gets no SVID for an
    /// identity the registrations do not give it; the join token is spent.
    func testNodesHoldNoSigningKeyAndGetOnlyTheirIdentities() throws {
        let (m, issuer) = try setUpMeshWithIssuer("ptrust1")
        let issuerDir = issuer.dir
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
        let issuerLog = issuer.log
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

    /// Two nodes sharing no secret: an issuer signs CSRs, etcd has
    /// authentication on with a role per node (`palisade store enable-auth`
    /// / `grant-node`), nodes learn each other from etcd only; b admits a
    /// on 8080 and serves an echo there.
    struct NothingShared {
        let mesh: Mesh
        let issuerDir: String
        let operatorConfig: String
        let cli: ([String], Bool) throws -> (status: Int32, output: String)
    }

    /// etcd on node 1 with authentication on, as an operator sets it up:
    /// root turns it on (`palisade store enable-auth`), then makes each
    /// node's user (`grant-node`). Returns the operator's configuration
    /// (root), each node's `store:` line and a CLI run on node 1.
    struct AuthenticatedStore {
        let url: String
        let operatorConfig: String
        let config: (Int) -> String
        let cli: ([String], Bool) throws -> (status: Int32, output: String)
    }

    func authenticatedStore(_ lab: Lab, dir: String, nodes: [Int]) throws -> AuthenticatedStore {
        let port = Int.random(in: 30000...39000)
        let etcd = try MeshStoreTests.startEtcd(lab, dir: "\(dir)/etcd", port: port)
        addTeardownBlock { etcd.terminate(); etcd.waitUntilExit() }
        let url = "http://10.200.0.1:\(port)"
        func secret(_ name: String, _ text: String) throws -> String {
            let path = "\(dir)/\(name)"
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            chmod(path, 0o600)
            return path
        }
        let rootPassword = try secret("root-password", "root-\(UUID().uuidString)")
        let anonymous = try secret("operator-anonymous.yaml", "tunnelAddress: off\nstore: {etcd: [\"\(url)\"]}\n")
        let operatorConfig = try secret("operator.yaml", "tunnelAddress: off\nstore: {etcd: [\"\(url)\"], user: root, passwordFile: \(rootPassword)}\n")
        let cli = { (args: [String], check: Bool) throws -> (status: Int32, output: String) in
            try sh(["nsenter", "--net=\(lab.nodeNetns(1))", Paths.palisade] + args, check: check)
        }
        _ = try cli(["store", "enable-auth", "--root-password-file", rootPassword, "--config", anonymous], true)
        var lines: [Int: String] = [:]
        for node in nodes {
            // (The password is the last line: the note about it goes to stderr.)
            let output = try cli(["store", "grant-node", "--node", "n\(node)", "--config", operatorConfig], true).output
            let file = try secret("n\(node)-password", String(output.split(separator: "\n").last ?? ""))
            lines[node] = "store: {etcd: [\"\(url)\"], user: palisade-node-n\(node), passwordFile: \(file)}"
        }
        return AuthenticatedStore(url: url, operatorConfig: operatorConfig, config: { lines[$0] ?? "" }, cli: cli)
    }

    func setUpNothingShared(_ prefix: String) throws -> NothingShared {
        try requireKernel()
        let lab = try Lab(self, prefix: prefix, meshPods: ["1:a", "2:b"])
        let (issuerProcess, issuer) = try startIssuer(lab, registrations: Self.registrationsAB)
        let issuerDir = issuerProcess.dir
        let store = try authenticatedStore(lab, dir: issuerDir, nodes: [1, 2])
        let (operatorConfig, cli) = (store.operatorConfig, store.cli)
        let (n1, n2) = try storeNodes(lab) { node in "\(store.config(node))\n\(issuer(node))" }
        try n1.start()
        try n2.start()
        try lab.serve("b", "tcp", port: 8080, address: "::")
        let mesh = MeshTests.Mesh(lab: lab, n1: n1, n2: n2)
        // Three reaches in a row: a connection made right after the first
        // success can still time out (its SYN unanswered while node 1
        // applies its first store generations), which is not what the
        // tests using this setup are about.
        var ok = false, streak = 0
        for _ in 0..<40 where streak < 3 {
            ok = try MeshTests.reach(mesh, from: "a", "10.102.1.2")
            streak = ok ? streak + 1 : 0
            if !ok { usleep(200_000) }
        }
        XCTAssertTrue(ok, "a reaches b: nodes learned each other from etcd, SVIDs from the issuer\n\(n1.logTail())\n\(n2.logTail())\n"
                      + ((try? n1.palisade(["status"], check: false).output) ?? ""))
        return NothingShared(mesh: mesh, issuerDir: issuerDir, operatorConfig: operatorConfig, cli: cli)
    }

    /// Traffic flows with nothing shared; a node's etcd user cannot write a
    /// policy (nor anything not its own), the operator's can.
    func testIssuerAndAuthenticatedStoreWithNothingShared() throws {
        let setup = try setUpNothingShared("ptrust2")
        let (n1, n2) = (setup.mesh.n1, setup.mesh.n2)
        XCTAssertFalse((n1.warnings() + n2.warnings()).contains("permission denied"), n1.warnings() + n2.warnings())
        for agent in [n1, n2] { XCTAssertFalse(FileManager.default.fileExists(atPath: "\(agent.dir)/ca")) }
        let policy = "\(setup.issuerDir)/open.yaml"
        try policyYAML("open-everything", "  selector: {labels: {app: b}}\n  ingress:\n    - from: [{cidr: 0.0.0.0/0}]\n")
            .write(toFile: policy, atomically: true, encoding: .utf8)
        let refused = try n1.palisade(["policy", "apply", "--store", policy], check: false)
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.output.contains("permission denied"), refused.output)
        let applied = try setup.cli(["policy", "apply", "--store", policy, "--config", setup.operatorConfig], false)
        XCTAssertEqual(applied.status, 0, applied.output)
    }

    /// `palisade ca revoke-node n1`: a connection from a to b held through
    /// the tunnel is cut within 3 s, new ones are refused, the issuer
    /// serves n1 nothing more and n1's etcd user is gone.
    func testRevokedNodeIsCutOffWithinSeconds() throws {
        let setup = try setUpNothingShared("ptrust3")
        let m = setup.mesh
        let holdLog = "\(m.n1.dir)/hold.log"
        let hold = try m.lab.spawn(netns: m.lab.netns("a"), cgroup: m.lab.podCgroup("a"),
                                   [Paths.python, Paths.probe, "hold", "10.102.1.2", "8080", "30", "0.05"], log: holdLog)
        usleep(1_000_000)
        XCTAssertTrue(hold.isRunning, (try? String(contentsOfFile: holdLog, encoding: .utf8)) ?? "")
        let revoked = Date()
        let out = try setup.cli(["ca", "revoke-node", "--state", setup.issuerDir, "--node", "n1", "--config", setup.operatorConfig], true).output
        XCTAssertTrue(out.contains("revoked/n1 written (tunnel address 10.200.0.1:15008)"), out)
        while hold.isRunning && Date().timeIntervalSince(revoked) < 10 { usleep(50_000) }
        let cut = Date().timeIntervalSince(revoked)
        XCTAssertFalse(hold.isRunning, "the held connection survived revocation")
        XCTAssertLessThan(cut, 3, "cut \(cut) s after revocation")
        let held = (try? String(contentsOfFile: holdLog, encoding: .utf8)) ?? ""
        if !held.contains("failed=1") {
            var flows = [m.n1, m.n2].map { (try? $0.palisade(["flows", "--verdict", "denied"], check: false).output) ?? "" }
            for kind in ["counters", "conntrack", "ipcache", "endpoints"] {
                flows[0] += "\n== n1 \(kind)\n" + ((try? m.n1.palisade(["maps", "dump", kind], check: false).output) ?? "")
            }
            XCTFail("hold: \(held)\n\(m.n1.logTail())\n\(m.n2.logTail())\ndenied flows n1:\n\(flows[0])\nn2:\n\(flows[1])")
        }
        XCTAssertFalse(try MeshTests.reach(m, from: "a", "10.102.1.2"), "new connections from the revoked node are refused")
        XCTAssertTrue(m.n2.warnings().contains("tunnel connections from revoked nodes closed"), m.n2.warnings())
        print("held connection cut \(String(format: "%.2f", cut)) s after palisade ca revoke-node")
    }

    /// The issuer goes down: traffic goes on on the SVIDs in hand, `palisade
    /// status` says the issuer is unreachable; it comes back: the status
    /// says so and the renewals that failed meanwhile succeed.
    func testIssuerDownThenBack() throws {
        let (m, issuer) = try setUpMeshWithIssuer("ptrust4", extraConfig: "svidLifetimeSeconds: 40")
        func status() -> String { (try? m.n1.palisade(["status"], check: false).output) ?? "" }
        func serial() -> String {
            let out = (try? m.n1.palisade(["certs", "list", "--output", "json"]).output) ?? "[]"
            let rows = (try? JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]]) ?? []
            return rows.first { $0["spiffeID"] as? String == "spiffe://test.local/ns/default/sa/a" }?["serial"] as? String ?? ""
        }
        var reached = false
        for _ in 0..<50 where !reached { reached = try reach(m, from: "a", "10.102.1.2"); if !reached { usleep(200_000) } }
        XCTAssertTrue(reached, m.n1.logTail())
        XCTAssertTrue(status().contains("issuer:     10.200.0.1:15100 reachable"), status())

        issuer.stop()
        let down = Date()
        while !status().contains("UNREACHABLE") && Date().timeIntervalSince(down) < 20 { usleep(500_000) }
        XCTAssertTrue(status().contains("issuer:     10.200.0.1:15100 UNREACHABLE"), status())
        XCTAssertTrue(try reach(m, from: "a", "10.102.1.2"), "traffic goes on while the issuer is down")
        let before = serial()

        try issuer.start()
        let back = Date()
        // (Renewal is due at half of the 40 s lifetime, whenever the issuer came back.)
        var reachableAgain: Double?
        while (serial() == before || reachableAgain == nil) && Date().timeIntervalSince(back) < 45 {
            if reachableAgain == nil, status().contains("reachable,") { reachableAgain = Date().timeIntervalSince(back) }
            usleep(500_000)
        }
        XCTAssertTrue(status().contains("issuer:     10.200.0.1:15100 reachable"), status())
        XCTAssertNotEqual(serial(), before, "renewal resumed once the issuer was back")
        XCTAssertTrue(try reach(m, from: "a", "10.102.1.2"))
        print("issuer down: traffic went on; back: reachable in status after \(String(format: "%.1f", reachableAgain ?? -1)) s, SVID renewed after \(String(format: "%.1f", Date().timeIntervalSince(back))) s")
    }

    /// `palisade ca rotate` under continuous traffic: new connections every
    /// 200 ms and one held connection from a to b through the tunnel while
    /// the root is rotated (prepare, switch, finish); none fails. Then a
    /// second rotation with node 2 down: switch is refused until it is back,
    /// then it catches up and the rotation completes.
    func testRootRotationDropsNothing() throws {
        let (m, issuer) = try setUpMeshWithIssuer("ptrust5")
        let dir = issuer.dir
        let rotate = issuer.rotate, rotateWhenReady = { try issuer.rotateWhenReady($0, within: 30) }
        func rootSerial() -> String { (try? sh(["openssl", "x509", "-noout", "-serial", "-in", "\(dir)/ca/ca.pem"]).output) ?? "" }
        var reached = false
        for _ in 0..<50 where !reached { reached = try reach(m, from: "a", "10.102.1.2"); if !reached { usleep(200_000) } }
        XCTAssertTrue(reached, m.n1.logTail())
        let oldRoot = rootSerial()

        let holdLog = "\(m.n1.dir)/hold.log"
        let hold = try m.lab.spawn(netns: m.lab.netns("a"), cgroup: m.lab.podCgroup("a"),
                                   [Paths.python, Paths.probe, "hold", "10.102.1.2", "8080", "70", "0.05"], log: holdLog)
        final class Traffic: @unchecked Sendable { let lock = NSLock(); var ok = 0, failed = 0, done = false }
        let traffic = Traffic()
        let mesh = m
        let client = Thread {
            while !traffic.lock.withLock({ traffic.done }) {
                let good = (try? MeshTests.reach(mesh, from: "a", "10.102.1.2")) ?? false
                traffic.lock.withLock { if good { traffic.ok += 1 } else { traffic.failed += 1 } }
                usleep(200_000)
            }
        }
        client.start()
        XCTAssertEqual(try rotate("switch").status, 1, "switch before prepare is refused")
        XCTAssertTrue(try rotate("prepare").output.contains("prepared"))
        XCTAssertTrue(try rotateWhenReady("switch").contains("switched"))
        XCTAssertTrue(try rotateWhenReady("finish").contains("finished"))
        // Traffic goes on after the old root is gone from every bundle.
        usleep(12_000_000)
        traffic.lock.withLock { traffic.done = true }
        while client.isExecuting { usleep(50_000) }
        let (ok, failed) = traffic.lock.withLock { (traffic.ok, traffic.failed) }
        XCTAssertEqual(failed, 0, "\(failed) of \(ok + failed) new connections failed during the rotation\n\(m.n1.logTail())\n\(m.n2.logTail())")
        XCTAssertGreaterThan(ok, 50)
        XCTAssertTrue(hold.isRunning, "the held connection survived the rotation: \((try? String(contentsOfFile: holdLog, encoding: .utf8)) ?? "")")
        hold.terminate()
        XCTAssertNotEqual(rootSerial(), oldRoot)
        let status = issuer.caStatus
        XCTAssertTrue(status.contains("phase:      idle") && status.contains("n1") && status.contains("n2"), status)
        print("rotation under traffic: \(ok) new connections, 0 failed; a held connection kept")

        // A node down during the next rotation holds it up, then catches up.
        m.n2.stop()
        XCTAssertTrue(try rotate("prepare").output.contains("prepared"))
        usleep(12_000_000)
        let refused = try rotate("switch")
        XCTAssertEqual(refused.status, 1)
        XCTAssertTrue(refused.output.contains("not every node trusts the new root yet: n2"), refused.output)
        try m.n2.start()
        XCTAssertTrue(try rotateWhenReady("switch").contains("switched"))
        XCTAssertTrue(try rotateWhenReady("finish").contains("finished"))
        var back = false
        for _ in 0..<50 where !back { back = try reach(m, from: "a", "10.102.1.2"); if !back { usleep(200_000) } }
        XCTAssertTrue(back, "a reaches b after the second rotation\n\(m.n2.logTail())")
    }
}
