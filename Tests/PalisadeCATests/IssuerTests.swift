import Crypto
import Foundation
import PalisadeIdentity
import XCTest
import X509
@testable import PalisadeCA
@testable import PalisadeIssuer
import PalisadeStore

/// The issuer over real HTTPS on loopback: a node joins once with a
/// one-time token, then gets SVIDs only for the SPIFFE IDs it is entitled
/// to; keys stay on the node; an issuer that is not the trust domain's is
/// not believed.
final class IssuerTests: XCTestCase {
    var dir: String!
    var issuer: Issuer!
    var server: IssuerServer!
    var refusals: [String] = []

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "palisade-issuer-\(UUID().uuidString)"
        let ca = try CertificateAuthority.loadOrCreate(directory: "\(dir!)/issuer/ca", trustDomain: "shop.test")
        let registrations = try Registrations.parse("""
            apiVersion: palisade.dev/v1
            kind: Registrations
            entries:
              - nodes: ["web-*"]
                spiffeIDs: ["spiffe://shop.test/ns/web/*", "spiffe://shop.test/ns/shared/sa/cache"]
            """, file: "registrations.yaml")
        issuer = Issuer(ca: ca, tokens: try JoinTokens(directory: "\(dir!)/issuer/tokens"), registrations: registrations,
                        nodeLifetime: 600, svidLifetime: 300)
        server = try IssuerServer(issuer: issuer, host: "127.0.0.1", port: 0)
    }

    override func tearDownWithError() throws {
        server?.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// A node's SVID store signed by the issuer, with its node SVID read
    /// back from its own files (as the agent does).
    func node(_ name: String, token: String?, bundle: [Certificate]? = nil) throws -> (SVIDStore, SpiffeID, IssuerClient) {
        let nodeID = try Issuer.nodeID(name, trustDomain: "shop.test")
        let svidDir = "\(dir!)/\(name)/svids"
        let holder = StoreHolder()
        let client = IssuerClient(addresses: [HostPort(host: "127.0.0.1", port: server.localPort)], nodeID: nodeID, bundle: bundle ?? issuer.ca.bundle,
                                  credentials: { holder.store?.credentials(nodeID) }, joinToken: { token })
        let store = try SVIDStore(directory: svidDir, signer: client, lifetime: 300)
        holder.store = store
        return (store, nodeID, client)
    }

    final class StoreHolder: @unchecked Sendable { var store: SVIDStore? }

    func testNodeJoinsOnceThenGetsOnlyWhatItIsEntitledTo() throws {
        let token = try issuer.tokens.create(node: "web-1", ttl: 600)
        let (store, nodeID, _) = try node("web-1", token: token)
        let web = try SpiffeID("spiffe://shop.test/ns/web/sa/frontend")
        let cache = try SpiffeID("spiffe://shop.test/ns/shared/sa/cache")
        let billing = try SpiffeID("spiffe://shop.test/ns/billing/sa/api")
        let otherNode = try Issuer.nodeID("db-1", trustDomain: "shop.test")
        let issued = try store.ensure([nodeID, web, cache, billing, otherNode], first: nodeID)
        XCTAssertEqual(Set(issued), [nodeID, web, cache])
        XCTAssertEqual(Set(store.refused.keys), [billing, otherNode])
        XCTAssertTrue(store.refused[billing]?.contains("no registration allows") ?? false, "\(store.refused)")
        // What the node holds chains to the trust domain's root and names the ID asked for.
        let verifier = SPIFFEVerifier(bundles: ["shop.test": issuer.ca.bundle])
        for id in [nodeID, web] {
            let pem = try String(contentsOfFile: XCTUnwrap(store.cached(id)).certificateFile, encoding: .utf8)
            let chain = try IssuerClient.certificates(pem)
            let verified = try awaitResult { await verifier.verify(leaf: chain[0], intermediates: Array(chain.dropFirst())) }
            XCTAssertEqual(try verified.get(), id)
        }
        // No signing key on the node: only its own SVID keys, mode 0600.
        let files = try FileManager.default.subpathsOfDirectory(atPath: "\(dir!)/web-1")
        XCTAssertEqual(Set(files.filter { !$0.hasPrefix("svids/") }), ["svids"], "nothing but SVIDs: \(files)")
        XCTAssertEqual(files.filter { $0.hasSuffix(".key") }.count, 3, "one key per SVID: \(files)")
        for f in files where f.hasSuffix(".key") {
            let mode = try FileManager.default.attributesOfItem(atPath: "\(dir!)/web-1/\(f)")[.posixPermissions] as? Int
            XCTAssertEqual(mode, 0o600, f)
        }
        XCTAssertEqual(issuer.counters["issued/node-joined"], 1)
        XCTAssertEqual(issuer.counters["refused/not-entitled"], 1)
        XCTAssertEqual(issuer.counters["refused/reserved"], 1)
    }

    func testJoinTokensAreSingleUseBoundToOneNodeAndExpire() throws {
        let token = try issuer.tokens.create(node: "web-1", ttl: 600)
        let (first, firstID, _) = try node("web-1", token: token)
        XCTAssertEqual(try first.ensure([firstID], first: firstID), [firstID])
        // The same token again, from another machine claiming to be web-1.
        let (again, againID, _) = try node("web-1b", token: token)
        XCTAssertEqual(try again.ensure([againID], first: againID), [])
        XCTAssertTrue(again.refused[againID]?.contains("unknown or already used join token") ?? false, "\(again.refused)")
        // A token for web-2 cannot get web-3's node SVID.
        let other = try issuer.tokens.create(node: "web-2", ttl: 600)
        let (wrong, wrongID, _) = try node("web-3", token: other)
        XCTAssertEqual(try wrong.ensure([wrongID], first: wrongID), [])
        XCTAssertTrue(wrong.refused[wrongID]?.contains("a join token for node web-2 cannot get spiffe://shop.test/palisade/node/web-3") ?? false,
                      "\(wrong.refused)")
        // Expired.
        let old = try issuer.tokens.create(node: "web-4", ttl: 600, now: Date().addingTimeInterval(-3600))
        let (late, lateID, _) = try node("web-4", token: old)
        XCTAssertEqual(try late.ensure([lateID], first: lateID), [])
        XCTAssertTrue(late.refused[lateID]?.contains("expired") ?? false, "\(late.refused)")
        // No token and no node SVID: a precise error, nothing written.
        let (none, noneID, _) = try node("web-5", token: nil)
        XCTAssertThrowsError(try none.ensure([noneID], first: noneID)) { XCTAssertTrue("\($0)".contains("join-token"), "\($0)") }
        // Token files hold digests only.
        let stored = try FileManager.default.contentsOfDirectory(atPath: "\(dir!)/issuer/tokens")
        for name in stored {
            let text = try String(contentsOfFile: "\(dir!)/issuer/tokens/\(name)", encoding: .utf8)
            XCTAssertFalse(text.contains(token) || text.contains(other), "a token in clear")
        }
    }

    /// A node SVID renews itself with itself (no token needed again).
    func testNodeRenewsWithItsOwnSVID() throws {
        let token = try issuer.tokens.create(node: "web-1", ttl: 600)
        let (store, nodeID, _) = try node("web-1", token: token)
        XCTAssertEqual(try store.ensure([nodeID], first: nodeID), [nodeID])
        let serial = store.cached(nodeID)?.serial
        // Past half-life: renewed over mTLS with the current node SVID.
        XCTAssertEqual(try store.ensure([nodeID], first: nodeID, now: Date().addingTimeInterval(400)), [nodeID])
        XCTAssertNotEqual(store.cached(nodeID)?.serial, serial)
        XCTAssertEqual(issuer.counters["issued/node-renewed"], 1)
    }

    /// With the issuer gone, a probe and a request fail at once (the
    /// agent's loop waits for them), not at a timeout.
    func testAnIssuerThatIsGoneFailsFast() throws {
        let token = try issuer.tokens.create(node: "web-1", ttl: 600)
        let (store, nodeID, client) = try node("web-1", token: token)
        XCTAssertEqual(try store.ensure([nodeID], first: nodeID), [nodeID])
        XCTAssertNoThrow(try client.probe())
        server.stop()
        var started = Date()
        XCTAssertThrowsError(try client.probe())
        XCTAssertLessThan(Date().timeIntervalSince(started), 1)
        started = Date()
        XCTAssertThrowsError(try store.ensure([nodeID], first: nodeID, now: Date().addingTimeInterval(400)))
        XCTAssertLessThan(Date().timeIntervalSince(started), 1)
        server = nil
    }

    /// A rotation seen from a node: the probe brings both roots and the
    /// new signing generation; after the switch, SVIDs come from the new
    /// root; a bundle with no root the node trusts is never taken.
    func testRotationReachesTheNodeThroughItsProbe() throws {
        let token = try issuer.tokens.create(node: "web-1", ttl: 600)
        let (store, nodeID, client) = try node("web-1", token: token)
        XCTAssertEqual(try store.ensure([nodeID], first: nodeID), [nodeID])
        XCTAssertEqual(try client.probe(), 0)
        let old = issuer.ca
        let next = try CertificateAuthority.loadOrCreate(directory: "\(dir!)/issuer/ca-next", trustDomain: "shop.test")
        issuer.current = .init(signing: old, trusted: [old, next], generation: 0)
        try server.reloadContext()
        XCTAssertEqual(try client.probe(), 0)
        XCTAssertEqual(Set(client.bundle), [old.certificate, next.certificate], "the node trusts both")
        XCTAssertEqual(try client.probe(), 0)
        XCTAssertEqual(issuer.nodeReports["web-1"]?.trusts.count, 2, "and says so at its next probe")
        issuer.current = .init(signing: next, trusted: [old, next], generation: 1)
        try server.reloadContext()
        XCTAssertEqual(try client.probe(), 1, "the new generation tells the node to re-issue")
        store.renewAll()
        XCTAssertEqual(try store.ensure([nodeID], first: nodeID), [nodeID])
        let chain = try IssuerClient.certificates(try String(contentsOfFile: XCTUnwrap(store.cached(nodeID)).certificateFile, encoding: .utf8))
        XCTAssertEqual(chain.first?.issuer, next.certificate.subject)
        XCTAssertEqual(issuer.nodeReports["web-1"]?.nodeSVIDSignedBy, next.certificate.serialNumber.description)
        // The old root retired: the node takes the bundle (it trusts the new root).
        issuer.current = .init(signing: next, trusted: [next], generation: 1)
        try server.reloadContext()
        XCTAssertEqual(try client.probe(), 1)
        XCTAssertEqual(client.bundle, [next.certificate])
        // A bundle sharing no root with the node's is refused.
        let stranger = try CertificateAuthority.loadOrCreate(directory: "\(dir!)/stranger", trustDomain: "shop.test")
        issuer.current = .init(signing: next, trusted: [next], generation: 1)
        XCTAssertNoThrow(try client.updateBundle(stranger.bundlePEM))
        XCTAssertEqual(client.bundle, [next.certificate])
    }

    /// Two issuers, each with its own intermediate of one offline root
    /// (`root.pem` beside it): a node that joined through the first keeps
    /// getting SVIDs from the second when the first is down, and everything
    /// issued verifies against the root alone.
    func testASecondIssuerTakesOverWithItsOwnIntermediate() throws {
        let root = try CertificateAuthority.loadOrCreate(directory: "\(dir!)/offline-root", trustDomain: "shop.test")
        func intermediate(_ name: String) throws -> CertificateAuthority {
            let key = P256.Signing.PrivateKey()
            let cert = try Certificate(
                version: .v3, serialNumber: .init(), publicKey: .init(key.publicKey),
                notValidBefore: Date().addingTimeInterval(-300), notValidAfter: Date().addingTimeInterval(86400),
                issuer: root.certificate.subject, subject: try DistinguishedName { OrganizationName("Palisade"); CommonName(name) },
                signatureAlgorithm: .ecdsaWithSHA256,
                extensions: try Certificate.Extensions {
                    Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                    Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                    SubjectKeyIdentifier(hash: .init(key.publicKey))
                    SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://shop.test")])
                },
                issuerPrivateKey: .init(root.key))
            let caDir = "\(dir!)/\(name)/ca"
            try FileManager.default.createDirectory(atPath: caDir, withIntermediateDirectories: true)
            try writeSecret(key.pemRepresentation, to: "\(caDir)/ca.key")
            try cert.serializeAsPEM().pemString.write(toFile: "\(caDir)/ca.pem", atomically: true, encoding: .utf8)
            try root.bundlePEM.write(toFile: "\(caDir)/root.pem", atomically: true, encoding: .utf8)
            return try CertificateAuthority.loadOrCreate(directory: caDir, trustDomain: "shop.test")
        }
        let registrations = issuer.registrations
        let first = Issuer(ca: try intermediate("issuer-a"), tokens: try JoinTokens(directory: "\(dir!)/issuer-a/tokens"), registrations: registrations)
        let second = Issuer(ca: try intermediate("issuer-b"), tokens: try JoinTokens(directory: "\(dir!)/issuer-b/tokens"), registrations: registrations)
        XCTAssertEqual(first.bundle, [root.certificate], "the root is the bundle, not the intermediate")
        let a = try IssuerServer(issuer: first, host: "127.0.0.1", port: 0)
        let b = try IssuerServer(issuer: second, host: "127.0.0.1", port: 0)
        defer { a.stop(); b.stop() }

        let nodeID = try Issuer.nodeID("web-1", trustDomain: "shop.test")
        let token = try first.tokens.create(node: "web-1", ttl: 600)
        let holder = StoreHolder()
        let client = IssuerClient(addresses: [HostPort(host: "127.0.0.1", port: a.localPort), HostPort(host: "127.0.0.1", port: b.localPort)],
                                  nodeID: nodeID, bundle: [root.certificate],
                                  credentials: { holder.store?.credentials(nodeID) }, joinToken: { token })
        let store = try SVIDStore(directory: "\(dir!)/web-1/svids", signer: client, lifetime: 300)
        holder.store = store
        let web = try SpiffeID("spiffe://shop.test/ns/web/sa/frontend")
        XCTAssertEqual(Set(try store.ensure([nodeID, web], first: nodeID)), [nodeID, web])
        XCTAssertEqual(first.counters["issued/workload"], 1)

        a.stop()
        store.renewAll()
        XCTAssertEqual(Set(try store.ensure([nodeID, web], first: nodeID)), [nodeID, web], "the second issuer answered")
        XCTAssertEqual(second.counters["issued/workload"], 1)
        XCTAssertEqual(second.counters["issued/node-renewed"], 1, "the node authenticated with the first issuer's SVID")
        let verifier = SPIFFEVerifier(bundles: ["shop.test": [root.certificate]])
        let chain = try IssuerClient.certificates(try String(contentsOfFile: XCTUnwrap(store.cached(web)).certificateFile, encoding: .utf8))
        XCTAssertEqual(chain.count, 2, "leaf and the second issuer's intermediate")
        XCTAssertEqual(try awaitResult { await verifier.verify(leaf: chain[0], intermediates: Array(chain.dropFirst())) }.get(), web)
    }

    /// A revoked node gets nothing more: no renewal, no workload SVID, no
    /// join with a fresh token.
    func testRevokedNodeGetsNothing() throws {
        let token = try issuer.tokens.create(node: "web-1", ttl: 600)
        let (store, nodeID, _) = try node("web-1", token: token)
        let web = try SpiffeID("spiffe://shop.test/ns/web/sa/frontend")
        XCTAssertEqual(Set(try store.ensure([nodeID, web], first: nodeID)), [nodeID, web])
        issuer.revoked = ["web-1"]
        XCTAssertEqual(try store.ensure([nodeID, web], first: nodeID, now: Date().addingTimeInterval(400)), [])
        XCTAssertTrue(store.refused[nodeID]?.contains("node web-1 is revoked") ?? false, "\(store.refused)")
        let again = try issuer.tokens.create(node: "web-1", ttl: 600)
        let rejoin = try SVIDRequest.make(nodeID, key: P256.Signing.PrivateKey())
        XCTAssertNil(issuer.join(token: again, csr: rejoin.csr).success, "a fresh token does not bring a revoked node back")
        XCTAssertEqual(issuer.counters["refused/revoked"], 3)
    }

    /// A server with a certificate from another trust domain's CA (or any
    /// SVID other than the issuer's) is not the issuer: nothing is sent.
    func testAnImpostorIssuerIsNotBelieved() throws {
        let other = try CertificateAuthority.loadOrCreate(directory: "\(dir!)/other/ca", trustDomain: "shop.test")
        let token = try issuer.tokens.create(node: "web-1", ttl: 600)
        let (store, nodeID, _) = try node("web-1", token: token, bundle: other.bundle)
        XCTAssertThrowsError(try store.ensure([nodeID], first: nodeID))
        XCTAssertNil(store.cached(nodeID))
        XCTAssertNotNil(issuer.tokens.consume(token).success, "the token was never sent")
    }

    /// With a store (here the file store), a node gets a workload SVID only
    /// for what the store lists on it (by key), on top of the registrations;
    /// nodes of another trust domain report which of this domain's roots
    /// they trust; the issuer publishes its roots under bundles/TD; the
    /// metrics follow a rotation's phase and the nodes' progress.
    func testTheStoreDecidesWhatANodeHostsAndFederatedNodesReport() throws {
        let store = try FileStore(path: "\(dir!)/store.json")
        func put(_ key: String, _ json: String) throws { try runBlocking { try await store.put("/palisade/\(key)", json) } }
        try put("workloads/web-1/frontend", #"{"spiffeID": "spiffe://shop.test/ns/web/sa/frontend"}"#)
        // (A record under another node's key does not count for web-1.)
        try put("workloads/web-2/admin", #"{"spiffeID": "spiffe://shop.test/ns/web/sa/admin"}"#)
        try put("nodes/eu-1", #"{"name": "eu-1", "trustDomain": "eu.test", "trusts": {"eu.test": ["7"], "shop.test": ["1", "2"]}}"#)
        try put("nodes/eu-2", #"{"name": "eu-2", "trustDomain": "eu.test", "trusts": {"eu.test": ["7"]}}"#)
        let view = IssuerStoreView(store: store, prefix: "/palisade/", trustDomain: "shop.test")
        view.start()
        defer { view.stop() }
        for _ in 0..<50 where !view.mirror.connected { usleep(20_000) }
        XCTAssertEqual(view.registered(node: "web-1"), [try SpiffeID("spiffe://shop.test/ns/web/sa/frontend")])
        XCTAssertEqual(view.federatedReports().keys.sorted(), ["eu-1@eu.test"], "eu-2 does not trust shop.test")
        XCTAssertEqual(view.federatedReports()["eu-1@eu.test"]?.trusts, ["1", "2"])

        let withStore = Issuer(ca: issuer.ca, tokens: issuer.tokens, registrations: issuer.registrations, nodeLifetime: 600, svidLifetime: 300,
                               registered: { view.registered(node: $0) })
        let node = try Issuer.nodeID("web-1", trustDomain: "shop.test")
        let asked = try ["frontend", "admin"].map { try SVIDRequest.make(SpiffeID("spiffe://shop.test/ns/web/sa/\($0)"), key: P256.Signing.PrivateKey()).csr }
        let answers = withStore.sign(node: node, csrs: asked, lifetime: 300)
        XCTAssertNotNil(answers[0].result.success)
        XCTAssertNil(answers[1].result.success, "allowed by the registrations, but not listed on web-1 in the store")
        XCTAssertEqual(withStore.counters["refused/not-registered"], 1)
        // A record appearing later is seen (the watch) and then allowed.
        try put("workloads/web-1/admin", #"{"spiffeID": "spiffe://shop.test/ns/web/sa/admin"}"#)
        for _ in 0..<50 where view.registered(node: "web-1").count < 2 { usleep(50_000) }
        XCTAssertNotNil(withStore.sign(node: node, csrs: [asked[1]], lifetime: 300)[0].result.success)

        try runBlocking { try await view.publishBundle(withStore.ca.bundlePEM) }
        XCTAssertEqual(try runBlocking { try await store.get("/palisade/bundles/shop.test")?.string }, withStore.ca.bundlePEM)

        // Metrics of a rotation: prepared, one federated node trusting the new root.
        let state = "\(dir!)/issuer"
        _ = try CertificateAuthority.loadOrCreate(directory: "\(state)/ca-next", trustDomain: "shop.test")
        var rotation = Rotation()
        rotation.phase = .prepared
        try rotation.save(state)
        var report = Issuer.NodeReport()
        report.trusts = [try XCTUnwrap(Rotation.rootSerial("\(state)/ca")), try XCTUnwrap(Rotation.rootSerial("\(state)/ca-next"))]
        report.trustDomain = "eu.test"
        try Rotation.saveFederated(["eu-1@eu.test": report], state: state)
        let text = String(decoding: IssuerMetrics(issuer: withStore, state: state, store: view).render(), as: UTF8.self)
        for line in ["palisade_issuer_rotation_phase{phase=\"prepared\"} 1", "palisade_issuer_rotation_phase{phase=\"idle\"} 0",
                     "palisade_issuer_rotation_nodes{state=\"trusting_new_root\"} 1", "palisade_issuer_rotation_nodes{state=\"reporting\"} 1",
                     "palisade_issuer_svids_issued_total{kind=\"workload\"} 2", "palisade_issuer_requests_refused_total{reason=\"not-registered\"} 1",
                     "palisade_issuer_store_connected 1"] {
            XCTAssertTrue(text.contains(line), "\(line) in\n\(text)")
        }
        XCTAssertTrue(text.contains("palisade_issuer_rotation_phase_entered_timestamp_seconds"), text)
    }

    func testRegistrationsParseAndMatch() throws {
        let r = try Registrations.parse("""
            apiVersion: palisade.dev/v1
            kind: Registrations
            entries:
              - nodes: [n1, "gpu-*-east"]
                spiffeIDs: ["spiffe://td/ns/ml/*", "spiffe://td/ns/db/sa/pg"]
            """, file: "r.yaml")
        XCTAssertTrue(r.allows(node: "n1", try SpiffeID("spiffe://td/ns/ml/sa/train")))
        XCTAssertTrue(r.allows(node: "gpu-7-east", try SpiffeID("spiffe://td/ns/db/sa/pg")))
        XCTAssertFalse(r.allows(node: "gpu-7-west", try SpiffeID("spiffe://td/ns/db/sa/pg")))
        XCTAssertFalse(r.allows(node: "n1", try SpiffeID("spiffe://td/ns/mlx/sa/a")), "a prefix ends at a /")
        XCTAssertFalse(r.allows(node: "n1", try SpiffeID("spiffe://td/ns/db/sa/pg2")))
        XCTAssertThrowsError(try Registrations.parse("apiVersion: palisade.dev/v1\nkind: Registrations\nentries:\n  - nodes: [a]\n    spiffeIDs: [\"spiffe://td/ns/*/sa/x\"]\n",
                                                     file: "r.yaml")) {
            XCTAssertTrue("\($0)".contains("r.yaml:5") && "\($0)".contains("a prefix ending in /*"), "\($0)")
        }
        XCTAssertThrowsError(try Registrations.parse("apiVersion: palisade.dev/v1\nkind: Registrations\nentries:\n  - nodes: [a]\n", file: "r.yaml")) {
            XCTAssertTrue("\($0)".contains("r.yaml:4") && "\($0)".contains("missing field 'spiffeIDs'"), "\($0)")
        }
    }
}

extension Result {
    var success: Success? { if case .success(let s) = self { return s }; return nil }
}

/// Runs async work from a synchronous test.
func awaitResult<T: Sendable>(_ work: @escaping @Sendable () async -> T) throws -> T {
    let box = ResultBox<T>()
    let done = DispatchSemaphore(value: 0)
    Task { box.value = await work(); done.signal() }
    done.wait()
    return box.value!
}

final class ResultBox<T>: @unchecked Sendable { var value: T? }
