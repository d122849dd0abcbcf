import Foundation
import PalisadeIdentity

/// Cluster-wide numeric identities, allocated in the store with
/// transactions: a number is taken by creating both `by-id/N` and
/// `by-spiffe/ID` in one transaction that requires neither to exist, so two
/// agents racing can never give one number to two SPIFFE IDs, nor two
/// numbers to one. Nodes record their use under `users/N/NODE`; an
/// identity nobody uses is deleted by a transaction that requires no users
/// and unchanged keys.
public actor ClusterIdentities {
    public let store: Store
    public let prefix: String
    public let first: UInt32
    public let last: UInt32

    public init(store: Store, prefix: String = "/palisade/identities/", first: UInt32 = NumericIdentity.firstWorkload,
                last: UInt32 = NumericIdentity.firstCIDR - 1) {
        self.store = store; self.prefix = prefix; self.first = first; self.last = last
    }

    func byID(_ n: UInt32) -> String { "\(prefix)by-id/\(n)" }
    func bySpiffe(_ id: SpiffeID) -> String {
        // Path-safe: percent-encode the SPIFFE ID into one key segment.
        "\(prefix)by-spiffe/\(id.description.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? id.description)"
    }
    func users(_ n: UInt32) -> String { "\(prefix)users/\(n)/" }

    public struct Exhausted: Error, CustomStringConvertible {
        public var description: String { "no free numeric identity left in the store's range" }
    }

    /// The two keys of an allocation disagree (written by hand, or by a node
    /// rewriting allocations it may write): the number is not believed.
    public struct Inconsistent: Error, CustomStringConvertible {
        public var id: SpiffeID
        public var number: UInt32
        public var description: String { "the store gives \(id) the number \(number), but by-id/\(number) names another identity" }
    }

    /// The identity for `id`, allocating it cluster-wide if it has none.
    public func identity(for id: SpiffeID, node: String? = nil) async throws -> NumericIdentity {
        for _ in 0..<64 {
            if let kv = try await store.get(bySpiffe(id)), let n = UInt32(kv.string) {
                guard try await store.get(byID(n))?.string == id.description else { throw Inconsistent(id: id, number: n) }
                if let node { try await store.put(users(n) + node, "") }
                return NumericIdentity(n)
            }
            // Next to the highest taken number; a lost race just retries.
            let (taken, _) = try await store.list(prefix: "\(prefix)by-id/")
            let numbers = Set(taken.compactMap { UInt32($0.key.split(separator: "/").last ?? "") })
            var candidate = (numbers.max().map { $0 + 1 } ?? first)
            if candidate > last { candidate = (first...last).first { !numbers.contains($0) } ?? 0 }
            guard candidate != 0 else { throw Exhausted() }
            var writes: [(key: String, value: [UInt8])] = [(byID(candidate), Array(id.description.utf8)),
                                                             (bySpiffe(id), Array("\(candidate)".utf8))]
            if let node { writes.append((users(candidate) + node, [])) }
            if try await store.createAll(writes) { return NumericIdentity(candidate) }
        }
        throw StoreError.unavailable("identity allocation for \(id) kept losing races")
    }

    /// Every allocated identity (number -> SPIFFE ID).
    public func all() async throws -> [UInt32: SpiffeID] {
        var out: [UInt32: SpiffeID] = [:]
        for kv in try await store.list(prefix: "\(prefix)by-id/").kvs {
            if let n = UInt32(kv.key.split(separator: "/").last ?? ""), let id = try? SpiffeID(kv.string) { out[n] = id }
        }
        return out
    }

    /// This node no longer uses `id`.
    public func release(_ n: NumericIdentity, node: String) async throws {
        try await store.delete(users(n.rawValue) + node)
    }

    /// Deletes identities no node uses; returns how many went.
    @discardableResult
    public func collectGarbage() async throws -> Int {
        var removed = 0
        for kv in try await store.list(prefix: "\(prefix)by-id/").kvs {
            guard let n = UInt32(kv.key.split(separator: "/").last ?? ""), let id = try? SpiffeID(kv.string),
                  let spiffeKey = try await store.get(bySpiffe(id)) else { continue }
            if try await store.deleteAllIf(unchanged: [(kv.key, kv.modRevision), (spiffeKey.key, spiffeKey.modRevision)],
                                           emptyPrefix: users(n)) {
                removed += 1
            }
        }
        return removed
    }
}
