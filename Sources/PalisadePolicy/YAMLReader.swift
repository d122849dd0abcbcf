import Yams

/// A precise complaint about an input file: where, which field, what was expected.
public struct InputError: Error, CustomStringConvertible, Hashable, Sendable {
    public var location: SourceLocation
    public var field: String
    public var message: String
    public init(_ location: SourceLocation, field: String, _ message: String) {
        self.location = location; self.field = field; self.message = message
    }
    public var description: String {
        field.isEmpty ? "\(location): \(message)" : "\(location): \(field): \(message)"
    }
}

/// A YAML node with its file, position and field path, so that every
/// validation error can say exactly where it is. Unknown fields are errors:
/// a typo must never be silently ignored in a security policy.
public struct YAMLValue {
    public let node: Node
    public let file: String
    public let path: String

    public init(node: Node, file: String, path: String = "") {
        self.node = node; self.file = file; self.path = path
    }

    public var location: SourceLocation {
        SourceLocation(file: file, line: node.mark?.line ?? 0, column: node.mark?.column ?? 0)
    }

    public func error(_ message: String) -> InputError { InputError(location, field: path, message) }

    /// Parses every document of a multi-document YAML text.
    public static func documents(_ text: String, file: String) throws -> [YAMLValue] {
        do {
            var out: [YAMLValue] = []
            // The basic resolver: scalars are read as text by this type's
            // accessors, so Yams' implicit typing (regular expressions run
            // through ICU, ~2 MB of its pages in the agent) buys nothing.
            var seq = try Yams.compose_all(yaml: text, .basic)
            while let node = seq.next() { out.append(YAMLValue(node: node, file: file)) }
            if let e = seq.error { throw e }
            return out
        } catch let e as YamlError {
            throw YAMLValue.translate(e, file: file)
        }
    }

    static func translate(_ e: YamlError, file: String) -> InputError {
        switch e {
        case .scanner(let ctx, let problem, let mark, _), .parser(let ctx, let problem, let mark, _), .composer(let ctx, let problem, let mark, _):
            let context = ctx.map { "\($0.text) " } ?? ""
            return InputError(SourceLocation(file: file, line: mark.line, column: mark.column), field: "", "invalid YAML: \(context)\(problem)")
        default:
            return InputError(SourceLocation(file: file, line: 0), field: "", "invalid YAML: \(e)")
        }
    }

    private func child(_ node: Node, _ suffix: String) -> YAMLValue {
        YAMLValue(node: node, file: file, path: path.isEmpty ? suffix : (suffix.hasPrefix("[") ? path + suffix : path + "." + suffix))
    }

    /// The mapping's entries; duplicate keys are an error.
    public func mapping(allowedKeys: Set<String>? = nil) throws -> [String: YAMLValue] {
        guard case .mapping(let m) = node else { throw error("expected a mapping, got \(kindName)") }
        var out: [String: YAMLValue] = [:]
        for (k, v) in m {
            guard case .scalar(let ks) = k else { throw YAMLValue(node: k, file: file, path: path).error("expected a string key") }
            let key = ks.string
            if let allowed = allowedKeys, !allowed.contains(key) {
                throw child(v, key).error("unknown field '\(key)' (expected one of: \(allowed.sorted().joined(separator: ", ")))")
            }
            if out[key] != nil { throw child(v, key).error("duplicate field '\(key)'") }
            out[key] = child(v, key)
        }
        return out
    }

    public func sequence() throws -> [YAMLValue] {
        guard case .sequence(let s) = node else { throw error("expected a list, got \(kindName)") }
        return s.enumerated().map { child($0.element, "[\($0.offset)]") }
    }

    public var isNull: Bool {
        if case .scalar(let s) = node { return s.tag.rawValue == Tag.Name.null.rawValue || (s.style == .plain && ["", "~", "null", "Null", "NULL"].contains(s.string)) }
        return false
    }

    public func string() throws -> String {
        guard case .scalar(let s) = node, !isNull else { throw error("expected a string, got \(kindName)") }
        return s.string
    }

    public func int(in range: ClosedRange<Int>) throws -> Int {
        guard case .scalar(let s) = node, let v = Int(s.string) else { throw error("expected an integer \(range.lowerBound)-\(range.upperBound), got \(kindName)") }
        guard range.contains(v) else { throw error("expected an integer \(range.lowerBound)-\(range.upperBound), got \(v)") }
        return v
    }

    public func bool() throws -> Bool {
        guard case .scalar(let s) = node else { throw error("expected true or false, got \(kindName)") }
        switch s.string { case "true", "True", "TRUE": return true; case "false", "False", "FALSE": return false
        default: throw error("expected true or false, got '\(s.string)'") }
    }

    public func stringMap() throws -> [String: String] {
        if isNull { return [:] }
        return try mapping().mapValues { try $0.string() }
    }

    public func stringList() throws -> [String] {
        if isNull { return [] }
        return try sequence().map { try $0.string() }
    }

    public var kindName: String {
        switch node {
        case .scalar(let s): return isNull ? "null" : "'\(s.string)'"
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }
}
