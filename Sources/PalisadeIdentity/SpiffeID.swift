/// A SPIFFE ID, validated per the SPIFFE ID specification:
/// `spiffe://` + trust domain (lowercase letters, digits, '.', '-', '_')
/// + a path of non-empty segments of letters, digits, '.', '-', '_' (no '.' or '..').
public struct SpiffeID: Hashable, Comparable, Codable, CustomStringConvertible, Sendable {
    public let trustDomain: String
    public let path: String   // "" or "/seg/seg"

    public enum ParseError: Error, CustomStringConvertible, Equatable {
        case scheme, emptyTrustDomain, trustDomainCharacter(Character), emptySegment, dotSegment, pathCharacter(Character)
        case queryOrFragment, trailingSlash, tooLong

        public var description: String {
            switch self {
            case .scheme: return "must start with spiffe://"
            case .emptyTrustDomain: return "trust domain is empty"
            case .trustDomainCharacter(let c): return "trust domain has invalid character '\(c)' (allowed: a-z 0-9 . - _)"
            case .emptySegment: return "path has an empty segment"
            case .dotSegment: return "path segment '.' or '..' is not allowed"
            case .pathCharacter(let c): return "path has invalid character '\(c)' (allowed: A-Z a-z 0-9 . - _)"
            case .queryOrFragment: return "query and fragment are not allowed"
            case .trailingSlash: return "path must not end with '/'"
            case .tooLong: return "longer than 2048 bytes"
            }
        }
    }

    public init(_ text: String) throws {
        guard text.utf8.count <= 2048 else { throw ParseError.tooLong }
        guard text.hasPrefix("spiffe://") else { throw ParseError.scheme }
        let rest = text.dropFirst("spiffe://".count)
        if rest.contains("?") || rest.contains("#") { throw ParseError.queryOrFragment }
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        let td = rest[rest.startIndex..<slash]
        guard !td.isEmpty else { throw ParseError.emptyTrustDomain }
        for c in td where !(c.isASCII && (c.isLowercase || c.isNumber || c == "." || c == "-" || c == "_")) {
            throw ParseError.trustDomainCharacter(c)
        }
        let path = String(rest[slash...])
        if !path.isEmpty {
            if path.hasSuffix("/") { throw ParseError.trailingSlash }
            for seg in path.dropFirst().split(separator: "/", omittingEmptySubsequences: false) {
                if seg.isEmpty { throw ParseError.emptySegment }
                if seg == "." || seg == ".." { throw ParseError.dotSegment }
                for c in seg where !(c.isASCII && (c.isLetter || c.isNumber || c == "." || c == "-" || c == "_")) {
                    throw ParseError.pathCharacter(c)
                }
            }
        }
        trustDomain = String(td)
        self.path = path
    }

    public var description: String { "spiffe://\(trustDomain)\(path)" }

    /// True if this ID is `prefix` or lies beneath it (segment-wise, so
    /// spiffe://td/ns/a does not match the prefix spiffe://td/ns/ab).
    public func isWithin(_ prefix: SpiffeID) -> Bool {
        trustDomain == prefix.trustDomain && (prefix.path.isEmpty || path == prefix.path || path.hasPrefix(prefix.path + "/"))
    }

    public static func < (a: SpiffeID, b: SpiffeID) -> Bool { a.description < b.description }

    public init(from decoder: Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        try self.init(text)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}
