import Crypto
import Foundation
import PalisadeIdentity
import SwiftASN1
import X509

public struct CAError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// The trust domain's certificate authority: a self-signed ECDSA P-256 root
/// made on first start, or a root/intermediate the operator supplies as PEM.
/// The key lives only in the state directory, mode 0600.
public final class CertificateAuthority: Sendable {
    /// SVIDs are valid from this long before issuance, for peers whose clocks lag.
    public static let clockSkewAllowance: TimeInterval = 60
    public let trustDomain: String
    public let certificate: Certificate
    let key: P256.Signing.PrivateKey
    /// Certificates sent after a leaf: for an operator-supplied intermediate,
    /// the chain up to (not including) the root; empty for a self-made root.
    public let intermediates: [Certificate]
    /// The trust anchors peers are given: `root.pem` when the operator put
    /// the (offline) root there, so issuers with different intermediates of
    /// one root are trusted alike; else the signing certificate itself.
    public let roots: [Certificate]

    init(trustDomain: String, certificate: Certificate, key: P256.Signing.PrivateKey, intermediates: [Certificate], roots: [Certificate]? = nil) {
        self.trustDomain = trustDomain; self.certificate = certificate; self.key = key
        self.roots = roots ?? [certificate]
        // With a separate root, the signing certificate itself travels too.
        self.intermediates = roots == nil ? intermediates : [certificate] + intermediates
    }

    /// Loads `dir/ca.pem` + `dir/ca.key` (and optional `dir/chain.pem`, the
    /// certificates between it and the root, and `dir/root.pem`, the root),
    /// or creates a new root there. A key file readable by others is refused.
    public static func loadOrCreate(directory dir: String, trustDomain: String, now: Date = Date()) throws -> CertificateAuthority {
        let certPath = "\(dir)/ca.pem", keyPath = "\(dir)/ca.key", chainPath = "\(dir)/chain.pem"
        let fm = FileManager.default
        if fm.fileExists(atPath: certPath) {
            let mode = (try fm.attributesOfItem(atPath: keyPath)[.posixPermissions] as? NSNumber)?.intValue ?? 0
            guard mode & 0o077 == 0 else { throw CAError("\(keyPath) is readable by group or others (mode \(String(mode, radix: 8))); expected 0600") }
            let cert = try Certificate(pemEncoded: String(contentsOfFile: certPath, encoding: .utf8))
            let key = try P256.Signing.PrivateKey(pemRepresentation: String(contentsOfFile: keyPath, encoding: .utf8))
            guard Certificate.PublicKey(key.publicKey) == cert.publicKey else { throw CAError("\(keyPath) does not match \(certPath)") }
            guard let bc = try cert.extensions.basicConstraints, case .isCertificateAuthority = bc else {
                throw CAError("\(certPath) is not a CA certificate")
            }
            func certificates(_ path: String) throws -> [Certificate]? {
                guard fm.fileExists(atPath: path) else { return nil }
                return try PEMDocument.parseMultiple(pemString: String(contentsOfFile: path, encoding: .utf8)).map { try Certificate(pemDocument: $0) }
            }
            return CertificateAuthority(trustDomain: trustDomain, certificate: cert, key: key, intermediates: try certificates(chainPath) ?? [],
                                        roots: try certificates("\(dir)/root.pem"))
        }
        let key = P256.Signing.PrivateKey()
        let name = try DistinguishedName {
            OrganizationName("Palisade")
            CommonName("Palisade root CA for \(trustDomain)")
        }
        let publicKey = Certificate.PublicKey(key.publicKey)
        let cert = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: publicKey,
            notValidBefore: now.addingTimeInterval(-300), notValidAfter: now.addingTimeInterval(10 * 365 * 86400),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: publicKey)
                SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://\(trustDomain)")])
            },
            issuerPrivateKey: Certificate.PrivateKey(key))
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try writeSecret(key.pemRepresentation, to: keyPath)
        try cert.serializeAsPEM().pemString.write(toFile: certPath, atomically: true, encoding: .utf8)
        return CertificateAuthority(trustDomain: trustDomain, certificate: cert, key: key, intermediates: [])
    }

    /// Issues an X.509-SVID per the SPIFFE X509-SVID specification: exactly
    /// one URI SAN (the SPIFFE ID), not a CA, digitalSignature only, server
    /// and client auth, short-lived.
    public func issue(_ id: SpiffeID, publicKey: Certificate.PublicKey, lifetime: TimeInterval, now: Date = Date()) throws -> Certificate {
        guard id.trustDomain == trustDomain else { throw CAError("\(id) is not in trust domain \(trustDomain)") }
        let notAfter = min(now.addingTimeInterval(lifetime), certificate.notValidAfter)
        return try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: publicKey,
            notValidBefore: now.addingTimeInterval(-CertificateAuthority.clockSkewAllowance), notValidAfter: notAfter,
            issuer: certificate.subject,
            subject: try DistinguishedName { OrganizationName("Palisade") },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectKeyIdentifier(hash: publicKey)
                AuthorityKeyIdentifier(keyIdentifier: try certificate.extensions.subjectKeyIdentifier?.keyIdentifier)
                SubjectAlternativeNames([.uniformResourceIdentifier(id.description)])
            },
            issuerPrivateKey: Certificate.PrivateKey(key))
    }

    /// The PEM trust bundle of this trust domain (its root).
    public var bundlePEM: String { roots.compactMap { try? $0.serializeAsPEM().pemString }.joined(separator: "\n") }
}

/// Writes a private key: created with mode 0600 before any byte is written.
public func writeSecret(_ text: String, to path: String) throws {
    let tmp = path + ".tmp"
    unlink(tmp)
    let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw CAError("cannot create \(tmp): \(String(cString: strerror(errno)))") }
    let data = Array(text.utf8)
    let written = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    close(fd)
    guard written == data.count, rename(tmp, path) == 0 else { throw CAError("cannot write \(path)") }
}
