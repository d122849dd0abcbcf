import Foundation
import NIOConcurrencyHelpers

/// A live copy of every key under a prefix, for readers that do not publish
/// (the issuer): a full list, then a watch from that revision; on an error
/// the last copy stays and the mirror lists again (which also covers a
/// compacted history). `changed` runs after every change seen.
public final class StoreMirror: Sendable {
    public let store: Store
    public let prefix: String
    private let records = NIOLockedValueBox<[String: [UInt8]]>([:])
    private let status = NIOLockedValueBox<(connected: Bool, lastError: String?)>((false, nil))
    private let task = NIOLockedValueBox<Task<Void, Never>?>(nil)
    private let changed: @Sendable () -> Void
    private let failed: @Sendable (String) -> Void

    public init(store: Store, prefix: String, changed: @escaping @Sendable () -> Void = {}, failed: @escaping @Sendable (String) -> Void = { _ in }) {
        self.store = store; self.prefix = prefix; self.changed = changed; self.failed = failed
    }

    /// Every key and value under the prefix, as last seen.
    public var snapshot: [String: [UInt8]] { records.withLockedValue { $0 } }
    public var connected: Bool { status.withLockedValue { $0.connected } }
    public var lastError: String? { status.withLockedValue { $0.lastError } }

    public func start() {
        let t = Task { [weak self] in
            var backoff: UInt64 = 200_000_000
            while !Task.isCancelled {
                guard let self else { return }
                do {
                    let (kvs, revision) = try await self.store.list(prefix: self.prefix)
                    self.records.withLockedValue { $0 = Dictionary(kvs.map { ($0.key, $0.value) }, uniquingKeysWith: { a, _ in a }) }
                    self.status.withLockedValue { $0 = (true, nil) }
                    self.changed()
                    backoff = 200_000_000
                    for try await event in self.store.watch(prefix: self.prefix, afterRevision: revision) {
                        self.records.withLockedValue { r in
                            switch event {
                            case .put(let kv): r[kv.key] = kv.value
                            case .delete(let key, _): r[key] = nil
                            }
                        }
                        self.changed()
                    }
                } catch {
                    self.status.withLockedValue { $0 = (false, "\(error)") }
                    self.failed("\(error)")
                }
                try? await Task.sleep(nanoseconds: backoff)
                backoff = min(backoff * 2, 5_000_000_000)
            }
        }
        task.withLockedValue { $0 = t }
    }

    public func stop() { task.withLockedValue { $0?.cancel(); $0 = nil } }
}
