import Foundation
import PalisadeIdentity
import SwiftASN1
@_spi(FixedExpiryValidationTime) import X509

/// Why a certificate was refused, in words an operator can act on.
public struct SVIDRejection: Error, CustomStringConvertible, Equatable {
    public var reason: String
    public init(_ r: String) { reason = r }
    public var description: String { reason }
}

/// The SPIFFE X509-SVID rules for a leaf, on top of RFC 5280 chain
/// validation: exactly one URI SAN holding a valid SPIFFE ID in the expected
/// trust domain, not a CA, digitalSignature set, keyCertSign/cRLSign unset.
struct SPIFFELeafPolicy: VerifierPolicy {
    let trustDomain: String
    let verifyingCriticalExtensions: [ASN1ObjectIdentifier] = [
        .X509ExtensionID.keyUsage, .X509ExtensionID.subjectAlternativeName, .X509ExtensionID.extendedKeyUsage,
    ]

    mutating func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) async -> PolicyEvaluationResult {
        switch SPIFFEVerifier.checkLeaf(chain.leaf, trustDomain: trustDomain) {
        case .success: return .meetsPolicy
        case .failure(let r): return .failsToMeetPolicy(reason: .init(r.reason))
        }
    }
}

/// Verifies X.509-SVIDs against the trust bundle of the peer's own trust
/// domain (federation: one bundle per trust domain, several roots per
/// bundle during a root rotation).
public struct SPIFFEVerifier: Sendable {
    public var bundles: [String: [Certificate]]
    public init(bundles: [String: [Certificate]]) { self.bundles = bundles }

    /// Identifies the set of trusted roots (trust domains and serials):
    /// equal when nothing a handshake depends on changed.
    public var fingerprint: String {
        bundles.map { "\($0.key)=\($0.value.map { $0.serialNumber.description }.sorted())" }.sorted().joined(separator: ";")
    }

    /// The SPIFFE ID of a leaf that satisfies the SVID rules (not its chain).
    public static func checkLeaf(_ leaf: Certificate, trustDomain: String?) -> Result<SpiffeID, SVIDRejection> {
        let sans: [GeneralName]
        do { sans = Array(try leaf.extensions.subjectAlternativeNames ?? SubjectAlternativeNames([])) } catch {
            return .failure(.init("unreadable subjectAltName: \(error)"))
        }
        let uris = sans.compactMap { n -> String? in if case .uniformResourceIdentifier(let u) = n { return u }; return nil }
        guard uris.count == 1 else { return .failure(.init("an SVID has exactly one URI SAN, this certificate has \(uris.count)")) }
        guard uris[0].hasPrefix("spiffe://") else { return .failure(.init("URI SAN '\(uris[0])' is not a spiffe:// ID")) }
        let id: SpiffeID
        do { id = try SpiffeID(uris[0]) } catch { return .failure(.init("URI SAN '\(uris[0])' is not a valid SPIFFE ID: \(error)")) }
        if let td = trustDomain, id.trustDomain != td { return .failure(.init("\(id) is not in trust domain \(td)")) }
        guard !id.path.isEmpty else { return .failure(.init("a workload SVID's SPIFFE ID has a path; \(id) has none")) }
        do {
            if let bc = try leaf.extensions.basicConstraints, case .isCertificateAuthority = bc {
                return .failure(.init("leaf certificate has CA:TRUE"))
            }
            guard let ku = try leaf.extensions.keyUsage else { return .failure(.init("leaf certificate has no keyUsage")) }
            guard ku.digitalSignature else { return .failure(.init("leaf keyUsage lacks digitalSignature")) }
            if ku.keyCertSign || ku.cRLSign { return .failure(.init("leaf keyUsage has keyCertSign or cRLSign")) }
        } catch {
            return .failure(.init("unreadable extensions: \(error)"))
        }
        return .success(id)
    }

    /// Verifies leaf (+ intermediates) at `now`; returns the peer's SPIFFE ID.
    public func verify(leaf: Certificate, intermediates: [Certificate] = [], now: Date = Date()) async -> Result<SpiffeID, SVIDRejection> {
        let id: SpiffeID
        switch SPIFFEVerifier.checkLeaf(leaf, trustDomain: nil) {
        case .failure(let r): return .failure(r)
        case .success(let i): id = i
        }
        guard let roots = bundles[id.trustDomain], !roots.isEmpty else {
            return .failure(.init("no trust bundle for trust domain \(id.trustDomain)"))
        }
        var verifier = Verifier(rootCertificates: CertificateStore(roots)) {
            RFC5280Policy(fixedExpiryValidationTime: now)
            SPIFFELeafPolicy(trustDomain: id.trustDomain)
        }
        switch await verifier.validate(leaf: leaf, intermediates: CertificateStore(intermediates)) {
        case .validCertificate: return .success(id)
        case .couldNotValidate(let failures):
            let reasons = failures.map { "\($0.policyFailureReason)" }
            return .failure(.init(reasons.isEmpty ? "no chain to a root of \(id.trustDomain)'s bundle" : reasons.joined(separator: "; ")))
        }
    }
}
