import Crypto
import Foundation
import XCTest
import X509
@testable import PalisadeCA
import PalisadeIdentity

/// Every negative case of the SPIFFE X509-SVID specification is refused;
/// the positive ones are accepted. All certificates are made here.
final class SVIDTests: XCTestCase {
    var dir: String!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "palisade-ca-\(UUID().uuidString)"
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(atPath: dir) }

    func ca(_ td: String, _ sub: String = "a") throws -> CertificateAuthority {
        try CertificateAuthority.loadOrCreate(directory: "\(dir!)/\(sub)", trustDomain: td)
    }

    /// A leaf signed by `ca` with whatever (possibly wrong) properties a case needs.
    func leaf(_ ca: CertificateAuthority, sans: [GeneralName], isCA: Bool = false, usage: KeyUsage = KeyUsage(digitalSignature: true),
              notBefore: Date = Date().addingTimeInterval(-60), notAfter: Date = Date().addingTimeInterval(3600)) throws -> Certificate {
        let key = P256.Signing.PrivateKey()
        return try Certificate(
            version: .v3, serialNumber: .init(), publicKey: .init(key.publicKey), notValidBefore: notBefore, notValidAfter: notAfter,
            issuer: ca.certificate.subject, subject: try DistinguishedName { OrganizationName("test") }, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(isCA ? BasicConstraints.isCertificateAuthority(maxPathLength: nil) : BasicConstraints.notCertificateAuthority)
                Critical(usage)
                SubjectAlternativeNames(sans)
            },
            issuerPrivateKey: .init(ca.key))
    }

    func assertRejected(_ verifier: SPIFFEVerifier, _ cert: Certificate, _ text: String, now: Date = Date(), line: UInt = #line) async {
        switch await verifier.verify(leaf: cert, now: now) {
        case .success(let id): XCTFail("accepted \(id), expected a rejection mentioning '\(text)'", line: line)
        case .failure(let r): XCTAssertTrue(r.reason.contains(text), "rejected for '\(r.reason)', expected '\(text)'", line: line)
        }
    }

    func testIssuedSVIDFollowsTheSpecAndVerifies() async throws {
        let root = try ca("example.org")
        let key = P256.Signing.PrivateKey()
        let id = try SpiffeID("spiffe://example.org/ns/prod/sa/web")
        let svid = try root.issue(id, publicKey: .init(key.publicKey), lifetime: 3600)
        XCTAssertEqual(Array(try svid.extensions.subjectAlternativeNames!), [.uniformResourceIdentifier(id.description)])
        XCTAssertEqual(try svid.extensions.basicConstraints, .notCertificateAuthority)
        let ku = try svid.extensions.keyUsage!
        XCTAssertTrue(ku.digitalSignature && !ku.keyCertSign && !ku.cRLSign)
        XCTAssertEqual(svid.notValidAfter.timeIntervalSince(svid.notValidBefore), 3660, accuracy: 2)
        let verifier = SPIFFEVerifier(bundles: ["example.org": [root.certificate]])
        let result = await verifier.verify(leaf: svid)
        XCTAssertEqual(try result.get(), id)
        // The CA key is private to the node.
        let mode = (try FileManager.default.attributesOfItem(atPath: "\(dir!)/a/ca.key")[.posixPermissions] as! NSNumber).intValue
        XCTAssertEqual(mode & 0o777, 0o600)
        // And a second start reuses the same root.
        XCTAssertEqual(try ca("example.org").certificate, root.certificate)
    }

    func testNegativeCasesAreRejected() async throws {
        let root = try ca("example.org")
        let v = SPIFFEVerifier(bundles: ["example.org": [root.certificate]])
        let good: [GeneralName] = [.uniformResourceIdentifier("spiffe://example.org/w")]
        await assertRejected(v, try leaf(root, sans: good, notAfter: Date().addingTimeInterval(-10)), "expired", now: Date())
        await assertRejected(v, try leaf(root, sans: good, notBefore: Date().addingTimeInterval(600)), "not yet valid")
        await assertRejected(v, try leaf(root, sans: []), "exactly one URI SAN")
        await assertRejected(v, try leaf(root, sans: [.dnsName("web.example.org")]), "exactly one URI SAN")
        await assertRejected(v, try leaf(root, sans: good + [.uniformResourceIdentifier("spiffe://example.org/x")]), "exactly one URI SAN")
        await assertRejected(v, try leaf(root, sans: [.uniformResourceIdentifier("https://example.org/w")]), "not a spiffe:// ID")
        await assertRejected(v, try leaf(root, sans: [.uniformResourceIdentifier("spiffe://example.org/a//b")]), "not a valid SPIFFE ID")
        await assertRejected(v, try leaf(root, sans: [.uniformResourceIdentifier("spiffe://example.org")]), "has none")
        await assertRejected(v, try leaf(root, sans: good, isCA: true), "CA:TRUE")
        await assertRejected(v, try leaf(root, sans: good, usage: KeyUsage(digitalSignature: true, keyCertSign: true)), "keyCertSign")
        await assertRejected(v, try leaf(root, sans: good, usage: KeyUsage(keyEncipherment: true)), "digitalSignature")
        // Signed by a root the bundle does not hold (same trust domain name).
        let rogue = try ca("example.org", "rogue")
        await assertRejected(v, try leaf(rogue, sans: good), "no chain to a root of example.org")
        if case .success = await v.verify(leaf: try leaf(rogue, sans: good)) { XCTFail("a chain to an unknown root was accepted") }
        // A trust domain we hold no bundle for.
        let other = try ca("other.org", "other")
        await assertRejected(v, try leaf(other, sans: [.uniformResourceIdentifier("spiffe://other.org/w")]), "no trust bundle for trust domain other.org")
        // An ID of trust domain B signed by trust domain A's root, with B federated.
        let federated = SPIFFEVerifier(bundles: ["example.org": [root.certificate], "other.org": [other.certificate]])
        if case .success = await federated.verify(leaf: try leaf(root, sans: [.uniformResourceIdentifier("spiffe://other.org/w")])) {
            XCTFail("example.org's root vouched for other.org")
        }
        let fromOther = await federated.verify(leaf: try leaf(other, sans: [.uniformResourceIdentifier("spiffe://other.org/w")]))
        XCTAssertEqual(try fromOther.get(), try SpiffeID("spiffe://other.org/w"))
    }

    func testRootRotationTrustsTwoRoots() async throws {
        let old = try ca("example.org", "old"), new = try ca("example.org", "new")
        let v = SPIFFEVerifier(bundles: ["example.org": [old.certificate, new.certificate]])
        for root in [old, new] {
            let svid = try root.issue(try SpiffeID("spiffe://example.org/w"), publicKey: .init(P256.Signing.PrivateKey().publicKey), lifetime: 600)
            let result = await v.verify(leaf: svid)
            XCTAssertNoThrow(try result.get())
        }
    }

    func testLooseKeyFileIsRefused() throws {
        _ = try ca("example.org")
        chmod("\(dir!)/a/ca.key", 0o644)
        XCTAssertThrowsError(try ca("example.org")) { XCTAssertTrue("\($0)".contains("expected 0600"), "\($0)") }
    }

    func testStoreIssuesRotatesAtHalfLifeAndRemoves() throws {
        let root = try ca("example.org")
        let store = try SVIDStore(directory: "\(dir!)/svids", signer: root, lifetime: 3600)
        let web = try SpiffeID("spiffe://example.org/ns/prod/sa/web"), api = try SpiffeID("spiffe://example.org/ns/prod/sa/api")
        let t0 = Date()
        XCTAssertEqual(Set(try store.ensure([web, api], now: t0)), [web, api])
        XCTAssertEqual(try store.ensure([web, api], now: t0.addingTimeInterval(1700)), [], "nothing is due before half-life")
        let before = store.cached(web)!.serial
        XCTAssertEqual(Set(try store.ensure([web, api], now: t0.addingTimeInterval(1900))), [web, api], "re-issued past half-life")
        XCTAssertNotEqual(store.cached(web)!.serial, before)
        let listed = SVIDStore.list(directory: "\(dir!)/svids")
        XCTAssertEqual(Set(listed.map(\.spiffeID)), [web.description, api.description])
        for s in listed {
            let mode = (try FileManager.default.attributesOfItem(atPath: s.keyFile)[.posixPermissions] as! NSNumber).intValue
            XCTAssertEqual(mode & 0o777, 0o600, s.keyFile)
        }
        try store.ensure([web], now: t0.addingTimeInterval(1900))
        XCTAssertEqual(SVIDStore.list(directory: "\(dir!)/svids").map(\.spiffeID), [web.description], "an identity that left loses its SVID")
    }
}
