import Crypto
import Foundation
import PalisadeCA

/// One-time join tokens, kept in the issuer's state directory
/// (`tokens/`, mode 0700). Only a token's SHA-256 is stored: reading the
/// directory gives nobody a usable token. Using a token removes its file,
/// so of two joins with one token only the first succeeds.
public struct JoinTokens: Sendable {
    public let directory: String
    public init(directory: String) throws {
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    }

    struct Record: Codable { var node: String; var expires: Double }

    static func digest(_ token: String) -> String {
        SHA256.hash(data: Data(token.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    /// A new token for `node`, valid for `ttl` seconds.
    public func create(node: String, ttl: TimeInterval, now: Date = Date()) throws -> String {
        var random = [UInt8](repeating: 0, count: 32)
        guard getentropy(&random, random.count) == 0 else { throw CAError("no entropy for a join token") }
        let token = "pjt1." + Data(random).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
        let record = try JSONEncoder().encode(Record(node: node, expires: now.addingTimeInterval(ttl).timeIntervalSince1970))
        try writeSecret(String(decoding: record, as: UTF8.self), to: "\(directory)/\(Self.digest(token)).json")
        return token
    }

    /// Spends a token: the node it was made for, or why it is refused.
    /// An expired token is removed as well.
    public func consume(_ token: String, now: Date = Date()) -> Result<String, CAError> {
        let path = "\(directory)/\(Self.digest(token)).json"
        guard let data = FileManager.default.contents(atPath: path), let record = try? JSONDecoder().decode(Record.self, from: data) else {
            return .failure(CAError("unknown or already used join token"))
        }
        guard unlink(path) == 0 else { return .failure(CAError("unknown or already used join token")) }
        guard now.timeIntervalSince1970 < record.expires else { return .failure(CAError("join token expired")) }
        return .success(record.node)
    }
}
