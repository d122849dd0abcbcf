import Crypto
import Foundation
import PalisadeIdentity
import SwiftASN1
import X509

/// Who signs a node's SVIDs: the in-process CA of a one-machine setup, or
/// a remote issuer (`palisade ca serve`) that holds the only signing key.
/// Either way the private keys are made on the node and never leave it:
/// the signer sees certificate signing requests.
public protocol SVIDSigner: AnyObject, Sendable {
    /// The roots of this trust domain that peers' SVIDs chain to.
    var bundle: [Certificate] { get }
    /// Signs each request for at most `lifetime`; a refusal of one request
    /// (not entitled, bad CSR) is that request's failure, an unreachable
    /// signer a thrown error. A chain is leaf first, without the root.
    func sign(_ requests: [SVIDRequest], lifetime: TimeInterval, now: Date) throws -> [SpiffeID: Result<[Certificate], CAError>]
}

/// One SVID asked for: the SPIFFE ID, and a CSR signed by the new key.
public struct SVIDRequest: Sendable {
    public var id: SpiffeID
    public var csr: CertificateSigningRequest
    public init(id: SpiffeID, csr: CertificateSigningRequest) { self.id = id; self.csr = csr }

    /// A CSR for `id` signed with `key`: the SPIFFE ID as the only URI SAN
    /// (in an extension request), nothing else the signer would have to trust.
    public static func make(_ id: SpiffeID, key: P256.Signing.PrivateKey) throws -> SVIDRequest {
        let extensions = try Certificate.Extensions { SubjectAlternativeNames([.uniformResourceIdentifier(id.description)]) }
        let attributes = CertificateSigningRequest.Attributes([try .init(ExtensionRequest(extensions: extensions))])
        let csr = try CertificateSigningRequest(version: .v1, subject: try DistinguishedName { OrganizationName("Palisade") },
                                                privateKey: Certificate.PrivateKey(key), attributes: attributes)
        return SVIDRequest(id: id, csr: csr)
    }

    /// The SPIFFE ID a CSR asks for, once its signature is checked: the
    /// key's holder made it, and it names exactly one spiffe:// URI.
    public static func requestedID(_ csr: CertificateSigningRequest) -> Result<SpiffeID, CAError> {
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else { return .failure(CAError("the CSR's signature does not match its key")) }
        let sans: [GeneralName]
        do {
            let ext = try csr.attributes.extensionRequest?.extensions
            sans = Array(try ext?.subjectAlternativeNames ?? SubjectAlternativeNames([]))
        } catch { return .failure(CAError("unreadable extension request: \(error)")) }
        let uris = sans.compactMap { n -> String? in if case .uniformResourceIdentifier(let u) = n { return u }; return nil }
        guard uris.count == 1, sans.count == 1 else { return .failure(CAError("a CSR names exactly one SPIFFE ID and nothing else; this one has \(sans.count) names")) }
        do { return .success(try SpiffeID(uris[0])) } catch { return .failure(CAError("'\(uris[0])' is not a SPIFFE ID: \(error)")) }
    }

    public var pem: String { (try? csr.serializeAsPEM().pemString) ?? "" }

    public init(pem: String) throws {
        let csr = try CertificateSigningRequest(pemEncoded: pem)
        switch SVIDRequest.requestedID(csr) {
        case .success(let id): self.init(id: id, csr: csr)
        case .failure(let e): throw e
        }
    }
}

extension CertificateAuthority: SVIDSigner {
    /// The trust domain's anchors: the operator's root when given
    /// (`root.pem`), else the signing certificate itself.
    public var bundle: [Certificate] { roots }

    /// The in-process signer: every request of this node is signed (the
    /// node is the whole trust domain's only member that holds this key).
    public func sign(_ requests: [SVIDRequest], lifetime: TimeInterval, now: Date) throws -> [SpiffeID: Result<[Certificate], CAError>] {
        var out: [SpiffeID: Result<[Certificate], CAError>] = [:]
        for r in requests {
            out[r.id] = Result {
                guard case .success(let id) = SVIDRequest.requestedID(r.csr), id == r.id else { throw CAError("the CSR does not ask for \(r.id)") }
                return [try issue(id, publicKey: r.csr.publicKey, lifetime: lifetime, now: now)] + intermediates
            }.mapError { $0 as? CAError ?? CAError("\($0)") }
        }
        return out
    }
}
