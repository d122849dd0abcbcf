import Foundation
import Logging
import PalisadeIdentity
import PalisadePolicy
import PalisadeStore

/// What one node publishes about itself in the shared store.
struct NodeRecord: Codable, Equatable, Sendable {
    var name: String
    var tunnelAddress: String
    var trustDomain: String
    var spiffeID: String
    var locality: Locality?
    /// Root serials this node trusts, per trust domain: a federated
    /// domain's issuer waits for them before it switches to a new root.
    var trusts: [String: [String]]?
}

/// A node the operator revoked (`palisade ca revoke-node`), under
/// PREFIX/revoked/NAME: its records are ignored and its tunnels cut.
struct RevokedNode: Codable, Equatable, Sendable {
    var node: String
    var tunnelAddress: String?
    var revokedAt: Double
}

/// One workload of a node, as other nodes need it (identity, labels, addresses).
struct WorkloadRecord: Codable, Equatable, Sendable {
    var name: String
    var node: String
    var spiffeID: String
    var namespace: String
    var labels: [String: String]
    var namespaceLabels: [String: String]
    var addresses: [String]
    /// Named ports ("http=8080/tcp"); absent in records of older agents.
    var ports: [String]?
}

/// Keeps this node's records in the store and a live copy of everyone
/// else's: a full list, then a watch from that revision; on any error the
/// last known copy stays in force (enforcement never opens), the failure is
/// reported, and the sync starts over (list again: also covers compaction).
final class StoreSync: @unchecked Sendable {
    let store: Store
    let prefix: String
    let node: String
    let log: Logger
    private let lock = NSLock()
    private var records: [String: [UInt8]] = [:]   // key -> value, everything under prefix
    private var published: [String: [UInt8]] = [:]  // what this node wants in the store
    private var task: Task<Void, Never>?
    private(set) var revision: Int64 = 0
    private(set) var connected = false
    private(set) var lastError: String?
    /// Bumped on every change seen; the reconcile loop compares it.
    private(set) var version = 0

    /// The last copy seen, saved so that an agent restarted while the store
    /// is unreachable starts from it instead of from nothing.
    let cachePath: String?

    init(store: Store, prefix: String, node: String, log: Logger, cachePath: String? = nil) {
        self.store = store; self.prefix = prefix; self.node = node; self.log = log; self.cachePath = cachePath
        if let cachePath, let data = FileManager.default.contents(atPath: cachePath),
           let saved = try? JSONDecoder().decode([String: Data].self, from: data) {
            records = saved.mapValues { Array($0) }
            version = 1
            log.info("store: starting from the last saved copy", metadata: ["keys": "\(records.count)"])
        }
    }

    private func save() {
        guard let cachePath else { return }
        let snapshot = lock.withLock { records }
        guard let data = try? JSONEncoder().encode(snapshot.mapValues { Data($0) }) else { return }
        let tmp = cachePath + ".tmp"
        if FileManager.default.createFile(atPath: tmp, contents: data, attributes: [.posixPermissions: 0o600]) { rename(tmp, cachePath) }
    }

    var nodesPrefix: String { "\(prefix)nodes/" }
    var workloadsPrefix: String { "\(prefix)workloads/" }

    func start() {
        task = Task { [weak self] in
            var backoff: UInt64 = 200_000_000
            while !Task.isCancelled {
                guard let self else { return }
                do {
                    try await self.publishPending(force: true)
                    let (kvs, rev) = try await self.store.list(prefix: self.prefix)
                    self.replaceAll(kvs, revision: rev)
                    self.save()
                    backoff = 200_000_000
                    for try await e in self.store.watch(prefix: self.prefix, afterRevision: rev) {
                        self.apply(e)
                        self.save()
                        try await self.publishPending(force: false)
                    }
                } catch {
                    self.failed("\(error)")
                }
                try? await Task.sleep(nanoseconds: backoff)
                backoff = min(backoff * 2, 5_000_000_000)
            }
        }
    }

    func stop() { task?.cancel() }

    private func replaceAll(_ kvs: [KeyValue], revision rev: Int64) {
        lock.withLock {
            records = Dictionary(kvs.map { ($0.key, $0.value) }, uniquingKeysWith: { a, _ in a })
            revision = rev
            if !connected { log.info("store connected", metadata: ["revision": "\(rev)"]) }
            connected = true
            lastError = nil
            version += 1
        }
    }

    private func apply(_ e: WatchEvent) {
        lock.withLock {
            switch e {
            case .put(let kv):
                records[kv.key] = kv.value
                revision = max(revision, kv.modRevision)
            case .delete(let key, let rev):
                records[key] = nil
                revision = max(revision, rev)
            }
            version += 1
        }
    }

    private func failed(_ error: String) {
        let first = lock.withLock { () -> Bool in
            let was = connected
            connected = false
            lastError = error
            version += 1
            return was
        }
        if first { log.error("store unreachable; enforcing the last known state", metadata: ["error": "\(error)"]) }
    }

    /// Sets what this node publishes (its node record and workloads); the
    /// sync writes it now if connected, else when the store is back.
    func publish(node record: NodeRecord, workloads: [WorkloadRecord], bundlePEM: String? = nil) {
        let enc = JSONEncoder()
        enc.outputFormatting = .sortedKeys
        var want: [String: [UInt8]] = [:]
        // The trust domain's bundle, for federation (every node of a domain
        // writes the same roots).
        if let pem = bundlePEM { want["\(bundlesPrefix)\(record.trustDomain)"] = Array(pem.utf8) }
        if let d = try? enc.encode(record) { want["\(nodesPrefix)\(node)"] = Array(d) }
        for w in workloads { if let d = try? enc.encode(w) { want["\(workloadsPrefix)\(node)/\(w.name)"] = Array(d) } }
        lock.withLock { published = want }
        Task { try? await publishPending(force: false) }
    }

    /// Writes what differs between `published` and the store's copy, and
    /// deletes this node's keys it no longer publishes.
    func publishPending(force: Bool) async throws {
        let (want, have) = lock.withLock { (published, records) }
        for (k, v) in want where force || have[k] != v { try await store.put(k, v) }
        let mine = [nodesPrefix + node] + have.keys.filter { $0.hasPrefix("\(workloadsPrefix)\(node)/") }
        // (Bundles are shared by a trust domain's nodes: never deleted here.)
        for k in mine where want[k] == nil && have[k] != nil { try await store.delete(k) }
    }

    /// Other nodes and their workloads, from the live copy.
    func peers() -> (nodes: [NodeRecord], workloads: [WorkloadRecord]) {
        let snapshot = lock.withLock { records }
        let dec = JSONDecoder()
        let gone = Set(revoked().map(\.node))
        var nodes: [NodeRecord] = [], workloads: [WorkloadRecord] = []
        for (k, v) in snapshot {
            if k.hasPrefix(nodesPrefix), let n = try? dec.decode(NodeRecord.self, from: Data(v)), n.name != node, !gone.contains(n.name) { nodes.append(n) }
            if k.hasPrefix(workloadsPrefix), let w = try? dec.decode(WorkloadRecord.self, from: Data(v)), w.node != node, !gone.contains(w.node) {
                workloads.append(w)
            }
        }
        return (nodes.sorted { $0.name < $1.name }, workloads.sorted { ($0.node, $0.name) < ($1.node, $1.name) })
    }

    var revokedPrefix: String { "\(prefix)revoked/" }

    /// Nodes the operator revoked.
    func revoked() -> [RevokedNode] {
        let snapshot = lock.withLock { records }
        return snapshot.filter { $0.key.hasPrefix(revokedPrefix) }.compactMap { try? JSONDecoder().decode(RevokedNode.self, from: Data($0.value)) }
    }

    var policiesPrefix: String { "\(prefix)policies/" }
    var servicesPrefix: String { "\(prefix)services/" }
    var bundlesPrefix: String { "\(prefix)bundles/" }

    /// Trust bundles published by the nodes of every trust domain (PEM).
    func bundles() -> [String: String] {
        let snapshot = lock.withLock { records }
        var out: [String: String] = [:]
        for (k, v) in snapshot where k.hasPrefix(bundlesPrefix) { out[String(k.dropFirst(bundlesPrefix.count))] = String(decoding: v, as: UTF8.self) }
        return out
    }

    /// Global services defined in the store (JSON: name, vip, port, selector).
    func services() -> [GlobalService] {
        let snapshot = lock.withLock { records }
        return snapshot.filter { $0.key.hasPrefix(servicesPrefix) }.sorted { $0.key < $1.key }
            .compactMap { try? JSONDecoder().decode(GlobalService.self, from: Data($0.value)) }
    }

    /// Policies kept in the store (written once, enforced on every node),
    /// named "etcd:KEY" in errors and status.
    func policies() -> [(name: String, text: String)] {
        let snapshot = lock.withLock { records }
        return snapshot.filter { $0.key.hasPrefix(policiesPrefix) }.sorted { $0.key < $1.key }
            .map { ("etcd:\($0.key)", String(decoding: $0.value, as: UTF8.self)) }
    }

    var status: (connected: Bool, revision: Int64, error: String?) { lock.withLock { (connected, revision, lastError) } }
}

extension Agent {
    /// Numeric identities from the store, cluster-wide: the same number for a
    /// SPIFFE ID on every node (flows, metrics and map dumps agree). Done on
    /// the reconcile thread; while the store is unreachable, an identity not
    /// yet allocated there keeps a node-local number (the tunnel carries
    /// SPIFFE IDs, so enforcement does not depend on numbers agreeing).
    func allocateClusterIdentities(local: [SpiffeID], remote: [SpiffeID]) {
        guard let cluster = clusterIdentities, let sync = storeSync, sync.status.connected else { return }
        let node = sync.node
        let localSet = Set(local)
        for id in Set(local + remote).sorted() where !clusterAssigned.contains(id) {
            let isLocal = localSet.contains(id)
            do {
                let n = try runBlocking { try await cluster.identity(for: id, node: isLocal ? node : nil) }
                // The store's numbering is advisory: a number this node already
                // gave another identity is never taken from it (a node that
                // rewrites allocations can make numbers differ between nodes,
                // not give one identity another's rights here).
                // (A holder with a node-local number gives it up: it gets its
                // own number from the store in turn.)
                if let holder = state.allocator.spiffeID(of: n), holder != id, clusterAssigned.contains(holder) {
                    log.warning("identity number in the store already belongs to another identity here; keeping a node-local number",
                                metadata: ["spiffe-id": "\(id)", "number": "\(n.rawValue)", "holder": "\(holder)"])
                    clusterAssigned.insert(id)
                    continue
                }
                state.allocator.assign(id, n)
                clusterAssigned.insert(id)
            } catch let e as ClusterIdentities.Inconsistent {
                // (Asked again at the next reconcile: the operator may repair it.)
                log.warning("identity allocation in the store is inconsistent; keeping a node-local number", metadata: ["error": "\(e)"])
                continue
            } catch {
                log.warning("identity not allocated in the store yet; using a node-local number", metadata: ["spiffe-id": "\(id)", "error": "\(error)"])
                return
            }
        }
        // This node no longer uses identities of workloads it dropped.
        for id in clusterAssigned.subtracting(local + remote) {
            if let n = state.allocator.byID[id] { _ = try? runBlocking { try await cluster.release(n, node: node) } }
            clusterAssigned.remove(id)
        }
        if Date().timeIntervalSince(lastIdentityGC) > 60 {
            lastIdentityGC = Date()
            _ = try? runBlocking { try await cluster.collectGarbage() }
        }
    }
}
