import Foundation
import JWTKit
import XCTest
@testable import PalisadeJWT

final class JWTIdentityMapperTests: XCTestCase {
    struct Claims: JWTPayload {
        var iss: IssuerClaim
        var sub: SubjectClaim
        var aud: AudienceClaim
        var exp: ExpirationClaim
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    func jwks(_ key: ES256PrivateKey, kid: String) -> String {
        let p = key.publicKey.parameters!
        return #"{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":"\#(kid)","x":"\#(p.x)","y":"\#(p.y)"}]}"#
    }

    func token(_ key: ES256PrivateKey, kid: String, iss: String = "https://idp.example", sub: String = "alice",
               aud: String = "billing", exp: Date = Date().addingTimeInterval(300)) async throws -> String {
        let keys = JWTKeyCollection()
        await keys.add(ecdsa: key, kid: JWKIdentifier(string: kid))
        return try await keys.sign(Claims(iss: .init(value: iss), sub: .init(value: sub), aud: .init(value: [aud]), exp: .init(value: exp)),
                                   kid: JWKIdentifier(string: kid))
    }

    func testTokensAreExchangedOrRefused() async throws {
        let key = ES256PrivateKey(), other = ES256PrivateKey()
        let path = NSTemporaryDirectory() + "jwks-\(UUID().uuidString).json"
        try jwks(key, kid: "k1").write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let mapper = try await JWTIdentityMapper(issuers: [JWTIssuer(issuer: "https://idp.example", jwksFile: path, audience: "billing")])

        let ok = await mapper.identity(bearer: try await token(key, kid: "k1"))
        XCTAssertEqual(try ok.get(), "jwt:https://idp.example/alice")

        for (name, t) in [
            ("expired", try await token(key, kid: "k1", exp: Date().addingTimeInterval(-60))),
            ("other issuer", try await token(key, kid: "k1", iss: "https://evil.example")),
            ("other audience", try await token(key, kid: "k1", aud: "payroll")),
            ("unknown key", try await token(other, kid: "k1")),
            ("garbage", "not.a.jwt"),
            ("alg none", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJpc3MiOiJodHRwczovL2lkcC5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOlsiYmlsbGluZyJdLCJleHAiOjQxMDI0NDQ4MDB9."),
        ] {
            if case .success(let id) = await mapper.identity(bearer: t) { XCTFail("\(name) token accepted as \(id)") }
        }
    }

    func testBadJWKSIsAPreciseError() async throws {
        let path = NSTemporaryDirectory() + "jwks-bad-\(UUID().uuidString).json"
        try "{\"keys\": 3}".write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        do {
            _ = try await JWTIdentityMapper(issuers: [JWTIssuer(issuer: "i", jwksFile: path, audience: "a")])
            XCTFail("accepted a bad JWKS")
        } catch {
            XCTAssertTrue("\(error)".contains("JWKS \(path) for issuer i is invalid"), "\(error)")
        }
    }
}
