/// A DNS name a rule allows by name: `matchName` (one exact name) or
/// `matchPattern`, where a leading `*.` stands for one or more labels
/// (`*.example.com` matches `a.example.com` and `a.b.example.com`, not
/// `example.com`), a `*` inside a label for any characters of that label
/// (`api-*.example.com`), and `*` alone for every name. Names compare
/// without case and without the trailing dot.
public enum FQDNSelector: Hashable, Codable, Sendable, CustomStringConvertible, Comparable {
    case name(String)
    case pattern(String)

    public var description: String {
        switch self {
        case .name(let n): "matchName: \(n)"
        case .pattern(let p): "matchPattern: \(p)"
        }
    }

    public static func < (a: FQDNSelector, b: FQDNSelector) -> Bool { a.description < b.description }

    public func matches(_ name: String) -> Bool {
        let n = FQDNSelector.normalize(name)
        switch self {
        case .name(let want): return n == want
        case .pattern(let p): return FQDNSelector.match(pattern: Array(p.split(separator: ".", omittingEmptySubsequences: false)),
                                                          name: Array(n.split(separator: ".", omittingEmptySubsequences: false)))
        }
    }

    /// Lowercase, without a trailing dot.
    public static func normalize(_ name: String) -> String {
        var n = name.lowercased()
        if n.hasSuffix(".") { n.removeLast() }
        return n
    }

    static func match(pattern: [Substring], name: [Substring]) -> Bool {
        if pattern == ["*"] { return !name.isEmpty }
        if pattern.first == "*" {
            // `*.` at the front: one or more whole labels, then the rest exactly.
            let rest = Array(pattern.dropFirst())
            guard name.count > rest.count else { return false }
            return zip(rest, name.suffix(rest.count)).allSatisfy { labelMatches($0, $1) }
        }
        guard pattern.count == name.count else { return false }
        return zip(pattern, name).allSatisfy { labelMatches($0, $1) }
    }

    /// One label against one label of a pattern (`*` = any characters, none included).
    static func labelMatches(_ p: Substring, _ l: Substring) -> Bool {
        guard p.contains("*") else { return p == l }
        let parts = p.split(separator: "*", omittingEmptySubsequences: false)
        var rest = l[...]
        guard rest.hasPrefix(parts[0]) else { return false }
        rest = rest.dropFirst(parts[0].count)
        for (i, part) in parts.enumerated().dropFirst() {
            if i == parts.count - 1 { return rest.hasSuffix(part) && rest.count >= part.count }
            guard let r = rest.range(of: part) else { return false }
            rest = rest[r.upperBound...]
        }
        return true
    }

    /// Why a name or pattern is not acceptable, or nil. Names: labels of
    /// letters, digits, '-' and '_', 1-63 characters, 253 in all.
    public static func problem(name: String, pattern: Bool) -> String? {
        let n = normalize(name)
        if n.isEmpty { return "an empty name" }
        if n.utf8.count > 253 { return "a name longer than 253 characters" }
        if pattern && n == "*" { return nil }
        for (i, label) in n.split(separator: ".", omittingEmptySubsequences: false).enumerated() {
            if label.isEmpty { return "an empty label (two dots, or a leading dot)" }
            if label.utf8.count > 63 { return "label '\(label)' is longer than 63 characters" }
            for c in label where !(c.isASCII && (c.isLetter || c.isNumber || c == "-" || c == "_" || (pattern && c == "*"))) {
                return pattern ? "character '\(c)' in label '\(label)' (letters, digits, '-', '_' and '*')"
                               : "character '\(c)' in label '\(label)' (letters, digits, '-' and '_'; a wildcard needs matchPattern)"
            }
            if label == "*" && i > 0 { return "'*' as a whole label is only allowed first ('*.example.com')" }
            if label.contains("**") { return "'**' in label '\(label)'" }
        }
        return nil
    }
}

/// What DNS taught the agent: for each address, the names whose answers
/// carried it (an address shared by several names keeps them all).
public typealias LearnedNames = [IPAddress: Set<String>]
