import NIOCore
import PalisadeJWT
import PalisadeStore
import PalisadeL7
import PalisadeTunnel

/// Bearer tokens for the L7 proxy: requests to destinations whose HTTP
/// rules name JWT identities carry a token; the configured issuers' JWKS
/// (jwt-kit, PalisadeJWT) verify it into "jwt:ISSUER/SUBJECT".
public enum BearerTokens {
    /// Loads the issuers' keys once at start (jwt-kit's key collection is
    /// async; the agent is not on an event loop yet). nil without issuers;
    /// a JWKS that cannot be read or parsed stops the agent with its path.
    public static func verifier(issuers: [JWTIssuer]) throws -> BearerVerifier? {
        guard !issuers.isEmpty else { return nil }
        let mapper = try runBlocking { try await JWTIdentityMapper(issuers: issuers) }
        return { token, loop in
            let p = loop.makePromise(of: String?.self)
            p.completeWithTask {
                if case .success(let id) = await mapper.identity(bearer: token) { return id }
                return nil
            }
            return p.futureResult
        }
    }
}
