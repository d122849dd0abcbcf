/// How a flow or a request ended, in the words flow events, metric labels,
/// the access log and the CLI's filters all use.
public enum Outcome: String, CaseIterable, Sendable {
    case allowed, denied, audit
}

/// Identities derived from JWTs at the edge.
public enum JWTIdentity {
    /// The identity of a request whose bearer token did not verify: no
    /// allow rule names it, and every deny rule on JWT identities meets it.
    public static let unverified = "jwt:unverified"
}
