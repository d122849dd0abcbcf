import Foundation

/// The embedded default: one JSON file in the state directory, changed under
/// an exclusive lock (flock) and replaced atomically, with etcd-like
/// revisions, so the agent and the CLI on one node share it safely. Not a
/// distributed store: several nodes use etcd.
public final class FileStore: Store, @unchecked Sendable {
    public let path: String
    let lockPath: String

    struct Entry: Codable { var value: String; var create: Int64; var mod: Int64 }
    /// Recent changes, so a watch sees every one of them (like etcd's
    /// history, bounded; an older revision is reported as compacted).
    struct Change: Codable { var revision: Int64; var key: String; var entry: Entry? }
    struct Contents: Codable {
        var revision: Int64 = 0
        var kvs: [String: Entry] = [:]
        var changes: [Change] = []
        mutating func record(_ key: String) {
            changes.append(Change(revision: revision, key: key, entry: kvs[key]))
            if changes.count > FileStore.history { changes.removeFirst(changes.count - FileStore.history) }
        }
    }
    static let history = 10_000

    public init(path: String) throws {
        self.path = path
        lockPath = path + ".lock"
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    }

    /// Runs `body` on the contents under the lock; writes them back if changed.
    func locked<T>(_ body: (inout Contents) throws -> T) throws -> T {
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw StoreError.unavailable("cannot open \(lockPath): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        flock(fd, LOCK_EX)
        defer { flock(fd, LOCK_UN) }
        var c = read()
        let before = c.revision
        let result = try body(&c)
        if c.revision != before {
            let data = try JSONEncoder().encode(c)
            let tmp = path + ".tmp"
            guard FileManager.default.createFile(atPath: tmp, contents: data, attributes: [.posixPermissions: 0o600]), rename(tmp, path) == 0 else { throw StoreError.unavailable("cannot replace \(path)") }
        }
        return result
    }

    func read() -> Contents {
        guard let data = FileManager.default.contents(atPath: path), let c = try? JSONDecoder().decode(Contents.self, from: data) else { return Contents() }
        return c
    }

    static func kv(_ key: String, _ e: Entry) -> KeyValue {
        KeyValue(key: key, value: Data(base64Encoded: e.value).map(Array.init) ?? [], createRevision: e.create, modRevision: e.mod)
    }

    public func get(_ key: String) async throws -> KeyValue? {
        try locked { c in c.kvs[key].map { Self.kv(key, $0) } }
    }

    public func list(prefix: String) async throws -> (kvs: [KeyValue], revision: Int64) {
        try locked { c in (c.kvs.filter { $0.key.hasPrefix(prefix) }.sorted { $0.key < $1.key }.map { Self.kv($0.key, $0.value) }, c.revision) }
    }

    static func write(_ c: inout Contents, _ key: String, _ value: [UInt8]) {
        c.revision += 1
        let create = c.kvs[key]?.create ?? c.revision
        c.kvs[key] = Entry(value: Data(value).base64EncodedString(), create: create, mod: c.revision)
        c.record(key)
    }

    public func put(_ key: String, _ value: [UInt8]) async throws {
        try locked { Self.write(&$0, key, value) }
    }

    public func delete(_ key: String) async throws {
        try locked { c in
            if c.kvs.removeValue(forKey: key) != nil {
                c.revision += 1
                c.record(key)
            }
        }
    }

    public func createAll(_ kvs: [(key: String, value: [UInt8])]) async throws -> Bool {
        try locked { c in
            guard kvs.allSatisfy({ c.kvs[$0.key] == nil }) else { return false }
            for (k, v) in kvs { Self.write(&c, k, v) }
            return true
        }
    }

    public func deleteAllIf(unchanged: [(key: String, modRevision: Int64)], emptyPrefix: String?) async throws -> Bool {
        try locked { c in
            guard unchanged.allSatisfy({ c.kvs[$0.key]?.mod == $0.modRevision }),
                  emptyPrefix.map({ p in !c.kvs.keys.contains { $0.hasPrefix(p) } }) ?? true else { return false }
            c.revision += 1
            for u in unchanged {
                c.kvs[u.key] = nil
                c.record(u.key)
            }
            return true
        }
    }

    /// Polls the file's change history (one node: a change is seen within
    /// 100 ms, none is missed unless more than `history` happen meanwhile).
    public func watch(prefix: String, afterRevision revision: Int64) -> AsyncThrowingStream<WatchEvent, Error> {
        AsyncThrowingStream { continuation in
            let task = Task {
                var seen = revision > 0 ? revision : read().revision
                while !Task.isCancelled {
                    let now = read()
                    if now.revision > seen {
                        if let oldest = now.changes.first?.revision, oldest > seen + 1 {
                            continuation.finish(throwing: StoreError.compacted(revision: oldest))
                            return
                        }
                        for ch in now.changes where ch.revision > seen && ch.key.hasPrefix(prefix) {
                            if let e = ch.entry { continuation.yield(.put(Self.kv(ch.key, e))) }
                            else { continuation.yield(.delete(key: ch.key, revision: ch.revision)) }
                        }
                        seen = now.revision
                    }
                    try? await Task.sleep(nanoseconds: 100_000_000)
                }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}
