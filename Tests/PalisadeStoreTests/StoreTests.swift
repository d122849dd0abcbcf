import Foundation
import PalisadeTestSupport
import XCTest
import PalisadeIdentity
@testable import PalisadeStore

/// A real etcd (Debian's etcd-server) on loopback, started per test with
/// its own data directory and ports, killed at teardown.
final class EtcdProcess {
    let process = Process()
    let dir: String
    let url: String

    /// TLS material (CA, server and client certificates) when asked for.
    struct TLSFiles { var ca: String; var cert: String; var key: String }
    var tls: TLSFiles?

    init(_ test: XCTestCase, tls withTLS: Bool = false) throws {
        guard let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"].first(where: FileManager.default.isExecutableFile) else {
            let msg = "etcd-server is not installed (tools/install-deps installs it)"
            if ProcessInfo.processInfo.environment["CI"] == "true" { XCTFail(msg) }
            throw XCTSkip(msg)
        }
        dir = NSTemporaryDirectory() + "palisade-etcd-\(UUID().uuidString)"
        let client = freeLoopbackPort()
        var peer = freeLoopbackPort()
        while peer == client { peer = freeLoopbackPort() }
        url = "\(withTLS ? "https" : "http")://127.0.0.1:\(client)"
        var tlsArgs: [String] = []
        if withTLS {
            // A CA, a server certificate for 127.0.0.1 and a client certificate (openssl).
            let d = dir + "-pki"
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
            test.addTeardownBlock { try? FileManager.default.removeItem(atPath: d) }
            let script = """
            set -e; cd '\(d)'
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=etcd-ca
            printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext
            for who in server client; do
              openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $who.key -out $who.csr -subj /CN=$who
              openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $who.pem -days 1 -extfile san.ext
            done
            """
            let sh = Process()
            sh.executableURL = URL(fileURLWithPath: "/bin/sh")
            sh.arguments = ["-c", script]
            sh.standardOutput = FileHandle.nullDevice
            sh.standardError = FileHandle.nullDevice
            try sh.run()
            sh.waitUntilExit()
            tlsArgs = ["--cert-file", "\(d)/server.pem", "--key-file", "\(d)/server.key", "--client-cert-auth", "--trusted-ca-file", "\(d)/ca.pem"]
            tls = TLSFiles(ca: "\(d)/ca.pem", cert: "\(d)/client.pem", key: "\(d)/client.key")
        }
        process.executableURL = URL(fileURLWithPath: etcd)
        process.arguments = ["--name", "test", "--data-dir", dir, "--listen-client-urls", url, "--advertise-client-urls", url,
                             "--listen-peer-urls", "http://127.0.0.1:\(peer)", "--initial-advertise-peer-urls", "http://127.0.0.1:\(peer)",
                             "--initial-cluster", "test=http://127.0.0.1:\(peer)", "--log-level", "error"] + tlsArgs
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        test.addTeardownBlock { [self] in
            process.terminate()
            process.waitUntilExit()
            try? FileManager.default.removeItem(atPath: dir)
        }
        // Ready when the gateway answers.
        for _ in 0..<100 {
            let curl = Process()
            curl.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
            curl.arguments = ["-sf", "--max-time", "1"] + (tls.map { ["--cacert", $0.ca, "--cert", $0.cert, "--key", $0.key] } ?? []) + [url + "/health"]
            let out = Pipe()
            curl.standardOutput = out
            curl.standardError = FileHandle.nullDevice
            try curl.run()
            let d = out.fileHandleForReading.readDataToEndOfFile()
            curl.waitUntilExit()
            if String(decoding: d, as: UTF8.self).contains("\"true\"") { return }
            usleep(100_000)
        }
        throw StoreError.unavailable("etcd did not start at \(url)")
    }
}

final class StoreTests: XCTestCase {
    func exercise(_ store: Store) async throws {
        try await store.put("/p/a", "1")
        try await store.put("/p/b", "2")
        try await store.put("/q/c", "3")
        let a1 = try await store.get("/p/a")
        XCTAssertEqual(a1?.string, "1")
        let (kvs, rev) = try await store.list(prefix: "/p/")
        XCTAssertEqual(kvs.map(\.key), ["/p/a", "/p/b"])
        XCTAssertGreaterThan(rev, 0)
        let created1 = try await store.createAll([("/p/a", Array("x".utf8)), ("/p/new", [])])
        XCTAssertFalse(created1, "an existing key fails the whole transaction")
        let new1 = try await store.get("/p/new")
        XCTAssertNil(new1, "nothing of a failed transaction is written")
        let created2 = try await store.createAll([("/p/new", Array("n".utf8)), ("/p/new2", [])])
        XCTAssertTrue(created2)
        let a = try await store.get("/p/a")!
        try await store.put("/p/u/1", "")
        let blocked = try await store.deleteAllIf(unchanged: [("/p/a", a.modRevision)], emptyPrefix: "/p/u/")
        XCTAssertFalse(blocked, "a user blocks deletion")
        try await store.delete("/p/u/1")
        let deleted = try await store.deleteAllIf(unchanged: [("/p/a", a.modRevision)], emptyPrefix: "/p/u/")
        XCTAssertTrue(deleted)
        let gone = try await store.get("/p/a")
        XCTAssertNil(gone)

        // A watch sees later changes under its prefix only.
        let (_, now) = try await store.list(prefix: "/w/")
        let stream = store.watch(prefix: "/w/", afterRevision: now)
        try await Task.sleep(nanoseconds: 300_000_000)
        try await store.put("/w/x", "1")
        try await store.put("/elsewhere", "1")
        try await store.delete("/w/x")
        var seen: [WatchEvent] = []
        for try await e in stream {
            seen.append(e)
            if seen.count == 2 { break }
        }
        guard seen.count == 2, case .put(let kv) = seen[0], case .delete(let key, _) = seen[1] else { return XCTFail("\(seen)") }
        XCTAssertEqual(kv.key, "/w/x")
        XCTAssertEqual(key, "/w/x")
    }

    func testEtcdStore() async throws {
        let etcd = try EtcdProcess(self)
        let store = try EtcdStore(endpoints: [etcd.url])
        try await exercise(store)
        await store.shutdown()
    }

    /// etcd with authentication on and a role per node: a node reads
    /// everything and writes only its own keys; another node's keys and the
    /// operator's (policies, bundles) are refused by etcd itself; a wrong
    /// password is refused; an expired token is renewed.
    func testNodesWriteOnlyTheirOwnKeys() async throws {
        let etcd = try EtcdProcess(self)
        let admin = try EtcdStore(endpoints: [etcd.url])
        try await admin.enableAuthentication(rootPassword: "root-secret")
        let root = try EtcdStore(endpoints: [etcd.url], credentials: .init(user: "root", password: "root-secret"))
        try await root.grantNode("n1", prefix: "/palisade/", password: "n1-secret")
        try await root.grantNode("n2", prefix: "/palisade/", password: "n2-secret")
        try await root.put("/palisade/policies/p", Array("kind: Policy".utf8))

        let n1 = try EtcdStore(endpoints: [etcd.url], credentials: .init(user: "palisade-node-n1", password: "n1-secret"))
        try await n1.put("/palisade/nodes/n1", Array("{}".utf8))
        try await n1.put("/palisade/workloads/n1/web", Array("{}".utf8))
        let created = try await n1.createAll([(key: "/palisade/identities/by-id/300", value: Array("x".utf8))])
        XCTAssertTrue(created)
        let policy = try await n1.get("/palisade/policies/p")?.value
        XCTAssertEqual(policy, Array("kind: Policy".utf8), "a node reads the operator's keys")
        for key in ["/palisade/nodes/n2", "/palisade/workloads/n2/web", "/palisade/policies/p", "/palisade/bundles/test.local", "/elsewhere/x"] {
            do {
                try await n1.put(key, Array("forged".utf8))
                XCTFail("node n1 wrote \(key)")
            } catch let e as StoreError {
                guard case .permissionDenied = e else { XCTFail("\(key): \(e)"); continue }
            }
        }
        do {
            try await n1.delete("/palisade/policies/p")
            XCTFail("node n1 deleted a policy")
        } catch StoreError.permissionDenied {}
        let kept = try await root.get("/palisade/policies/p")?.value
        XCTAssertEqual(kept, Array("kind: Policy".utf8))
        let wrong = try EtcdStore(endpoints: [etcd.url], credentials: .init(user: "palisade-node-n1", password: "guess"))
        do {
            _ = try await wrong.get("/palisade/nodes/n1")
            XCTFail("a wrong password was accepted")
        } catch StoreError.permissionDenied {}
        // Anonymous requests are refused once authentication is on.
        do {
            try await admin.put("/palisade/nodes/n1", Array("x".utf8))
            XCTFail("an anonymous write was accepted")
        } catch StoreError.permissionDenied {}
        await admin.shutdown(); await root.shutdown(); await n1.shutdown(); await wrong.shutdown()
    }

    /// etcd requiring client certificates: the store works with them, and a
    /// client without one is refused.
    func testEtcdStoreWithMutualTLS() async throws {
        let etcd = try EtcdProcess(self, tls: true)
        let t = etcd.tls!
        let store = try EtcdStore(endpoints: [etcd.url], tls: .init(caFile: t.ca, certificateFile: t.cert, keyFile: t.key))
        try await exercise(store)
        await store.shutdown()
        let anonymous = try EtcdStore(endpoints: [etcd.url], tls: .init(caFile: t.ca))
        do {
            _ = try await anonymous.get("/p/new")
            XCTFail("a client without a certificate must be refused")
        } catch {}
        await anonymous.shutdown()
    }

    func testFileStore() async throws {
        let dir = NSTemporaryDirectory() + "palisade-filestore-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try await exercise(try FileStore(path: "\(dir)/store.json"))
    }

    /// An allocation whose two keys disagree (a node rewrote by-spiffe to
    /// point at another identity's number) is not believed.
    func testRewrittenAllocationIsNotBelieved() async throws {
        let dir = NSTemporaryDirectory() + "palisade-filestore-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try FileStore(path: "\(dir)/store.json")
        let allocator = ClusterIdentities(store: store)
        let x = try SpiffeID("spiffe://test.local/ns/default/sa/x"), y = try SpiffeID("spiffe://test.local/ns/default/sa/y")
        let nx = try await allocator.identity(for: x), ny = try await allocator.identity(for: y)
        XCTAssertNotEqual(nx, ny)
        let key = "/palisade/identities/by-spiffe/\(x.description.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!)"
        try await store.put(key, Array("\(ny.rawValue)".utf8))
        do {
            _ = try await allocator.identity(for: x)
            XCTFail("a rewritten allocation was believed")
        } catch let e as ClusterIdentities.Inconsistent {
            XCTAssertEqual(e.number, ny.rawValue)
        }
        let again = try await allocator.identity(for: y)
        XCTAssertEqual(again, ny, "the identity the number belongs to keeps it")
    }

    func testUnreachableEtcdIsAnErrorNotAHang() async throws {
        let store = try EtcdStore(endpoints: ["http://127.0.0.1:1"])
        let start = Date()
        do {
            _ = try await store.get("/x")
            XCTFail("expected an error")
        } catch let e as StoreError {
            guard case .unavailable = e else { return XCTFail("\(e)") }
        }
        XCTAssertLessThan(Date().timeIntervalSince(start), 3)
        await store.shutdown()
    }

    /// Many agents (each its own etcd client) allocate overlapping SPIFFE
    /// IDs at once: every ID gets one number, every number one ID.
    func testConcurrentAllocationNeverDuplicates() async throws {
        let etcd = try EtcdProcess(self)
        let ids = try (0..<30).map { try SpiffeID("spiffe://test.local/ns/default/sa/w\($0)") }
        let agents = 8
        let url = etcd.url
        let results = try await withThrowingTaskGroup(of: [SpiffeID: UInt32].self) { group in
            for a in 0..<agents {
                group.addTask {
                    let store = try EtcdStore(endpoints: [url])
                    let allocator = ClusterIdentities(store: store)
                    var mine: [SpiffeID: UInt32] = [:]
                    for id in ids.shuffled() { mine[id] = try await allocator.identity(for: id, node: "node\(a)").rawValue }
                    await store.shutdown()
                    return mine
                }
            }
            var all: [[SpiffeID: UInt32]] = []
            for try await r in group { all.append(r) }
            return all
        }
        XCTAssertEqual(results.count, agents)
        for id in ids {
            XCTAssertEqual(Set(results.map { $0[id] }).count, 1, "\(id) got one number everywhere")
        }
        let numbers = ids.map { results[0][$0]! }
        XCTAssertEqual(Set(numbers).count, ids.count, "no number was given to two SPIFFE IDs")
        XCTAssertTrue(numbers.allSatisfy { $0 >= NumericIdentity.firstWorkload })

        // Garbage collection: an identity goes only when no node uses it.
        let store = try EtcdStore(endpoints: [etcd.url])
        let allocator = ClusterIdentities(store: store)
        let none = try await allocator.collectGarbage()
        XCTAssertEqual(none, 0, "all in use")
        for a in 0..<agents { try await allocator.release(NumericIdentity(numbers[0]), node: "node\(a)") }
        let one = try await allocator.collectGarbage()
        XCTAssertEqual(one, 1)
        let left = try await allocator.all()
        XCTAssertNil(left[numbers[0]])
        XCTAssertEqual(left.count, ids.count - 1)
        await store.shutdown()
    }
}

