import Foundation

/// One key and its value as the store holds it.
public struct KeyValue: Sendable, Equatable {
    public var key: String
    public var value: [UInt8]
    /// Revision that created the key (etcd) or 0 (file store).
    public var createRevision: Int64
    public var modRevision: Int64
    public init(key: String, value: [UInt8], createRevision: Int64 = 0, modRevision: Int64 = 0) {
        self.key = key; self.value = value; self.createRevision = createRevision; self.modRevision = modRevision
    }
    public var string: String { String(decoding: value, as: UTF8.self) }
}

/// A change seen by a watch.
public enum WatchEvent: Sendable, Equatable {
    case put(KeyValue)
    case delete(key: String, revision: Int64)
}

public enum StoreError: Error, CustomStringConvertible, Equatable {
    /// The store cannot be reached (the agent keeps enforcing what it has).
    case unavailable(String)
    /// A watch asked for history the store no longer has: resync in full.
    case compacted(revision: Int64)
    /// The store answered something this client does not understand.
    case malformed(String)
    /// The store refused: wrong credentials, or a key this user may not write.
    case permissionDenied(String)

    public var description: String {
        switch self {
        case .unavailable(let s): "store unavailable: \(s)"
        case .compacted(let r): "store history compacted (oldest revision \(r)); full resync needed"
        case .malformed(let s): "unexpected answer from the store: \(s)"
        case .permissionDenied(let s): "store permission denied: \(s)"
        }
    }
}

/// Where agents share state. Two implementations: files in the state
/// directory (one node, no server) and etcd v3 (several nodes and clouds).
/// Palisade never replicates state itself.
public protocol Store: Sendable {
    func get(_ key: String) async throws -> KeyValue?
    /// Every key under `prefix`, and the revision the answer reflects.
    func list(prefix: String) async throws -> (kvs: [KeyValue], revision: Int64)
    func put(_ key: String, _ value: [UInt8]) async throws
    func delete(_ key: String) async throws
    /// Writes all the keys if none of them exists, atomically; false (and
    /// nothing written) if any exists.
    func createAll(_ kvs: [(key: String, value: [UInt8])]) async throws -> Bool
    /// Deletes all the keys if every one still has the given mod revision
    /// and nothing exists under `emptyPrefix`, atomically.
    func deleteAllIf(unchanged: [(key: String, modRevision: Int64)], emptyPrefix: String?) async throws -> Bool
    /// Changes under `prefix` after `revision` (0: from now on).
    func watch(prefix: String, afterRevision revision: Int64) -> AsyncThrowingStream<WatchEvent, Error>
}

extension Store {
    public func put(_ key: String, _ value: String) async throws { try await put(key, Array(value.utf8)) }
}

/// The key just after every key starting with `prefix` (etcd's range_end).
func prefixEnd(_ prefix: String) -> [UInt8] {
    var b = Array(prefix.utf8)
    while let last = b.last {
        if last < 0xff {
            b[b.count - 1] = last + 1
            return b
        }
        b.removeLast()
    }
    return [0]
}

/// Runs async store work from a synchronous caller (the CLI, the agent's
/// reconcile thread — never from an event loop or the cooperative pool).
public func runBlocking<T: Sendable>(_ work: @escaping @Sendable () async throws -> T) throws -> T {
    let done = DispatchSemaphore(value: 0)
    nonisolated(unsafe) var result: Result<T, Error>!
    Task {
        do { result = .success(try await work()) } catch { result = .failure(error) }
        done.signal()
    }
    done.wait()
    return try result.get()
}
