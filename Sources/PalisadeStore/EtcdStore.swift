import AsyncHTTPClient
import Foundation
import NIOCore
import NIOSSL

/// etcd v3 through its JSON gateway (`/v3/kv/...`, `/v3/watch`), which
/// etcd serves on its client port; TLS with a client certificate when
/// configured. Keys and values travel base64-encoded, int64s as strings.
public final class EtcdStore: Store, @unchecked Sendable {
    public struct TLS: Sendable {
        public var caFile: String
        public var certificateFile: String?
        public var keyFile: String?
        public init(caFile: String, certificateFile: String? = nil, keyFile: String? = nil) {
            self.caFile = caFile; self.certificateFile = certificateFile; self.keyFile = keyFile
        }
    }

    /// A user of etcd's authentication (etcd checks every request against
    /// the user's roles; see `grantNode`).
    public struct Credentials: Sendable {
        public var user: String
        public var password: String
        public init(user: String, password: String) { self.user = user; self.password = password }
    }

    public let endpoints: [String]
    let client: HTTPClient
    let timeout: TimeAmount
    let credentials: Credentials?
    private let lock = NSLock()
    private var preferred = 0
    /// etcd's simple token for `credentials` (expires when idle: renewed on refusal).
    private var token: String?

    /// `endpoints`: "http://host:2379" or "https://host:2379" (the first one
    /// that answers is used; a failure moves to the next).
    public init(endpoints: [String], tls: TLS? = nil, credentials: Credentials? = nil, timeout: TimeAmount = .seconds(2)) throws {
        precondition(!endpoints.isEmpty)
        self.endpoints = endpoints
        self.timeout = timeout
        self.credentials = credentials
        var config = HTTPClient.Configuration()
        config.timeout = .init(connect: .seconds(2), read: nil)
        if let tls {
            var t = TLSConfiguration.makeClientConfiguration()
            t.minimumTLSVersion = .tlsv12   // etcd 3.4 speaks TLS 1.2 and 1.3
            t.trustRoots = .file(tls.caFile)
            if let c = tls.certificateFile, let k = tls.keyFile {
                t.certificateChain = try NIOSSLCertificate.fromPEMFile(c).map { .certificate($0) }
                t.privateKey = .privateKey(try NIOSSLPrivateKey(file: k, format: .pem))
            }
            config.tlsConfiguration = t
        }
        client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: config)
    }

    deinit { try? client.syncShutdown() }

    public func shutdown() async { try? await client.shutdown() }

    // MARK: JSON gateway

    static func b64(_ s: String) -> String { Data(s.utf8).base64EncodedString() }
    static func b64(_ b: [UInt8]) -> String { Data(b).base64EncodedString() }
    static func unb64(_ s: Any?) -> [UInt8] { (s as? String).flatMap { Data(base64Encoded: $0) }.map(Array.init) ?? [] }
    static func int(_ v: Any?) -> Int64 { (v as? String).flatMap(Int64.init) ?? (v as? NSNumber)?.int64Value ?? 0 }

    func call(_ path: String, _ body: [String: Any]) async throws -> [String: Any] {
        do {
            return try await send(path, body, token: try await currentToken())
        } catch StoreError.permissionDenied(let why) where credentials != nil && why.contains("token") {
            // The token expired (etcd drops idle ones): authenticate again once.
            lock.withLock { token = nil }
            return try await send(path, body, token: try await currentToken())
        }
    }

    private func currentToken() async throws -> String? {
        guard let credentials else { return nil }
        if let t = lock.withLock({ token }) { return t }
        let r = try await send("/v3/auth/authenticate", ["name": credentials.user, "password": credentials.password], token: nil)
        guard let t = r["token"] as? String else { throw StoreError.malformed("/v3/auth/authenticate: no token") }
        lock.withLock { token = t }
        return t
    }

    private func send(_ path: String, _ body: [String: Any], token: String?) async throws -> [String: Any] {
        let data = try JSONSerialization.data(withJSONObject: body)
        var lastError = ""
        for attempt in 0..<endpoints.count {
            let i = lock.withLock { (preferred + attempt) % endpoints.count }
            var req = HTTPClientRequest(url: endpoints[i] + path)
            req.method = .POST
            req.headers.add(name: "content-type", value: "application/json")
            if let token { req.headers.add(name: "authorization", value: token) }
            req.body = .bytes(ByteBuffer(bytes: data))
            do {
                let resp = try await client.execute(req, timeout: timeout)
                let bytes = try await resp.body.collect(upTo: 64 << 20)
                guard let obj = try JSONSerialization.jsonObject(with: Data(bytes.readableBytesView)) as? [String: Any] else {
                    throw StoreError.malformed("\(path): not a JSON object")
                }
                if resp.status.code != 200 {
                    let message = "\(obj["error"] ?? obj["message"] ?? "")"
                    // gRPC codes 7 (permission denied) and 16 (unauthenticated), 3 for bad credentials.
                    let code = Self.int(obj["code"])
                    if code == 7 || code == 16 || resp.status.code == 401 || resp.status.code == 403
                        || message.contains("authentication failed") || message.contains("permission denied")
                        || message.contains("user name is empty") || message.contains("invalid auth token") {
                        throw StoreError.permissionDenied("\(path): \(message)")
                    }
                    throw StoreError.malformed("\(path): HTTP \(resp.status.code) \(message)")
                }
                lock.withLock { preferred = i }
                return obj
            } catch let e as StoreError {
                throw e
            } catch {
                lastError = "\(endpoints[i]): \(error)"
            }
        }
        throw StoreError.unavailable(lastError)
    }

    // MARK: authentication and roles (etcd's own users and roles)

    /// The role and user of node `name`, made by an operator (root): the
    /// node may read everything under `prefix` and write only its own keys:
    /// its node record, its workloads, and identity allocation (see README,
    /// "Trust model"). Policies, services, bundles and anything else under
    /// the prefix stay the operator's. Idempotent; sets the password.
    public func grantNode(_ name: String, prefix: String, password: String) async throws {
        let role = "palisade-node-\(name)", user = "palisade-node-\(name)"
        _ = try? await call("/v3/auth/role/add", ["name": role])
        func grant(_ key: String, rangeEnd: [UInt8]?, _ type: String) async throws {
            var perm: [String: Any] = ["permType": type, "key": Self.b64(key)]
            if let rangeEnd { perm["range_end"] = Self.b64(rangeEnd) }
            _ = try await call("/v3/auth/role/grant", ["name": role, "perm": perm])
        }
        try await grant(prefix, rangeEnd: prefixEnd(prefix), "READ")
        try await grant("\(prefix)nodes/\(name)", rangeEnd: nil, "READWRITE")
        try await grant("\(prefix)workloads/\(name)/", rangeEnd: prefixEnd("\(prefix)workloads/\(name)/"), "READWRITE")
        try await grant("\(prefix)identities/", rangeEnd: prefixEnd("\(prefix)identities/"), "READWRITE")
        if (try? await call("/v3/auth/user/add", ["name": user, "password": password])) == nil {
            _ = try await call("/v3/auth/user/changepw", ["name": user, "password": password])
        }
        _ = try await call("/v3/auth/user/grant", ["user": user, "role": role])
    }

    /// Removes a user (a revoked node's): its token stops working at once.
    public func deleteUser(_ name: String) async throws {
        _ = try await call("/v3/auth/user/delete", ["name": name])
    }

    /// Turns etcd's authentication on with a root user (first setup).
    public func enableAuthentication(rootPassword: String) async throws {
        _ = try? await call("/v3/auth/user/add", ["name": "root", "password": rootPassword])
        _ = try? await call("/v3/auth/user/grant", ["user": "root", "role": "root"])
        _ = try await call("/v3/auth/enable", [:])
    }

    /// The events of one line of etcd's watch stream (JSON gateway); a line
    /// that is not a result is skipped, a compaction is an error.
    public static func watchEvents(line: [UInt8]) throws -> [WatchEvent] {
        guard let obj = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any],
              let result = obj["result"] as? [String: Any] else { return [] }
        let compact = int(result["compact_revision"])
        if compact > 0 { throw StoreError.compacted(revision: compact) }
        return (result["events"] as? [[String: Any]] ?? []).map { e in
            let kv = keyValue(e["kv"] as? [String: Any] ?? [:])
            return (e["type"] as? String) == "DELETE" ? .delete(key: kv.key, revision: kv.modRevision) : .put(kv)
        }
    }

    /// A range answer: its pairs and the store's revision.
    public static func rangeResult(_ r: [String: Any]) -> (kvs: [KeyValue], revision: Int64) {
        ((r["kvs"] as? [[String: Any]] ?? []).map(keyValue), int((r["header"] as? [String: Any])?["revision"]))
    }

    static func keyValue(_ o: [String: Any]) -> KeyValue {
        KeyValue(key: String(decoding: unb64(o["key"]), as: UTF8.self), value: unb64(o["value"]),
                 createRevision: int(o["create_revision"]), modRevision: int(o["mod_revision"]))
    }

    // MARK: Store

    public func get(_ key: String) async throws -> KeyValue? {
        let r = try await call("/v3/kv/range", ["key": Self.b64(key)])
        return (r["kvs"] as? [[String: Any]])?.first.map(Self.keyValue)
    }

    public func list(prefix: String) async throws -> (kvs: [KeyValue], revision: Int64) {
        let r = try await call("/v3/kv/range", ["key": Self.b64(prefix), "range_end": Self.b64(prefixEnd(prefix))])
        return Self.rangeResult(r)
    }

    public func put(_ key: String, _ value: [UInt8]) async throws {
        _ = try await call("/v3/kv/put", ["key": Self.b64(key), "value": Self.b64(value)])
    }

    public func delete(_ key: String) async throws {
        _ = try await call("/v3/kv/deleterange", ["key": Self.b64(key)])
    }

    public func createAll(_ kvs: [(key: String, value: [UInt8])]) async throws -> Bool {
        let compare: [[String: Any]] = kvs.map { ["key": Self.b64($0.key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"] }
        let success: [[String: Any]] = kvs.map { ["request_put": ["key": Self.b64($0.key), "value": Self.b64($0.value)]] }
        let r = try await call("/v3/kv/txn", ["compare": compare, "success": success])
        return r["succeeded"] as? Bool ?? false
    }

    public func deleteAllIf(unchanged: [(key: String, modRevision: Int64)], emptyPrefix: String?) async throws -> Bool {
        var compare: [[String: Any]] = unchanged.map {
            ["key": Self.b64($0.key), "result": "EQUAL", "target": "MOD", "mod_revision": "\($0.modRevision)"]
        }
        if let p = emptyPrefix {
            // Every key in the range must not exist: a create_revision of 0
            // holds vacuously for an empty range and fails for any key.
            compare.append(["key": Self.b64(p), "range_end": Self.b64(prefixEnd(p)), "result": "EQUAL", "target": "CREATE", "create_revision": "0"])
        }
        let success: [[String: Any]] = unchanged.map { ["request_delete_range": ["key": Self.b64($0.key)]] }
        let r = try await call("/v3/kv/txn", ["compare": compare, "success": success])
        return r["succeeded"] as? Bool ?? false
    }

    public func watch(prefix: String, afterRevision revision: Int64) -> AsyncThrowingStream<WatchEvent, Error> {
        AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    var create: [String: Any] = ["key": Self.b64(prefix), "range_end": Self.b64(prefixEnd(prefix))]
                    if revision > 0 { create["start_revision"] = "\(revision + 1)" }
                    var req = HTTPClientRequest(url: endpoints[0] + "/v3/watch")
                    req.method = .POST
                    if let token = try await currentToken() { req.headers.add(name: "authorization", value: token) }
                    req.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: ["create_request": create])))
                    let resp = try await client.execute(req, timeout: .hours(24 * 365))
                    var pending: [UInt8] = []
                    for try await chunk in resp.body {
                        pending += chunk.readableBytesView
                        while let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
                            let line = Array(pending[..<nl])
                            pending.removeSubrange(...nl)
                            for e in try Self.watchEvents(line: line) { continuation.yield(e) }
                        }
                    }
                    continuation.finish(throwing: StoreError.unavailable("watch stream ended"))
                } catch {
                    continuation.finish(throwing: error is StoreError ? error : StoreError.unavailable("\(error)"))
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}
