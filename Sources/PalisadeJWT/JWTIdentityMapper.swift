import Foundation
import JWTKit

/// One trusted token issuer: its keys (a JWKS file), the audience tokens
/// must be for, and the prefix of the identities it vouches for.
public struct JWTIssuer: Sendable {
    public var issuer: String
    public var jwksFile: String
    public var audience: String
    public init(issuer: String, jwksFile: String, audience: String) {
        self.issuer = issuer; self.jwksFile = jwksFile; self.audience = audience
    }
}

/// The claims Palisade requires of an edge token.
struct EdgeClaims: JWTPayload {
    var iss: IssuerClaim
    var sub: SubjectClaim
    var aud: AudienceClaim
    var exp: ExpirationClaim
    var nbf: NotBeforeClaim?

    func verify(using algorithm: some JWTAlgorithm) async throws {
        try exp.verifyNotExpired()
        try nbf?.verifyNotBefore()
    }
}

public struct JWTRejection: Error, CustomStringConvertible, Equatable {
    public var reason: String
    public var description: String { reason }
}

/// Exchanges a bearer JWT from a configured issuer for an internal
/// identity ("jwt:ISSUER/SUBJECT") that L7 rules can match, following the
/// zero-trust practice of turning long-lived external tokens into
/// short-lived internal identities at the edge. Signature, issuer,
/// audience, expiry and not-before are all checked by jwt-kit; no JOSE is
/// parsed by hand. Only the tokens' own algorithms from the JWKS are used.
public actor JWTIdentityMapper {
    let issuers: [(JWTIssuer, JWTKeyCollection)]

    public init(issuers: [JWTIssuer]) async throws {
        var loaded: [(JWTIssuer, JWTKeyCollection)] = []
        for i in issuers {
            guard let json = try? String(contentsOfFile: i.jwksFile, encoding: .utf8) else {
                throw JWTRejection(reason: "cannot read JWKS \(i.jwksFile) for issuer \(i.issuer)")
            }
            let keys = JWTKeyCollection()
            do { try await keys.add(jwksJSON: json) } catch {
                throw JWTRejection(reason: "JWKS \(i.jwksFile) for issuer \(i.issuer) is invalid: \(error)")
            }
            loaded.append((i, keys))
        }
        self.issuers = loaded
    }

    public func identity(bearer token: String) async -> Result<String, JWTRejection> {
        var last = "no issuer is configured"
        for (issuer, keys) in issuers {
            do {
                let claims = try await keys.verify(token, as: EdgeClaims.self)
                guard claims.iss.value == issuer.issuer else { last = "issuer '\(claims.iss.value)' is not trusted"; continue }
                guard claims.aud.value.contains(issuer.audience) else {
                    return .failure(JWTRejection(reason: "token is not for audience '\(issuer.audience)'"))
                }
                return .success("jwt:\(issuer.issuer)/\(claims.sub.value)")
            } catch {
                last = "\(error)"
            }
        }
        return .failure(JWTRejection(reason: "token refused: \(last)"))
    }
}
