import ArgumentParser
import Foundation
import Logging
import PalisadeAgent
import PalisadeCA
import PalisadeIdentity
import PalisadeIssuer
import PalisadeMetrics
import PalisadeStore
import X509

/// `palisade ca serve`: the trust domain's issuer, the only process that
/// holds its signing key. Nodes configured with `issuer:` join it with a
/// one-time token and then send it CSRs (see README, "Trust model").
struct CAServe: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "serve", abstract: "Run the trust domain's issuer (holds the signing key; nodes send CSRs).")
    @Option(help: "The issuer's state directory: ca/ (key 0600), tokens/, registrations.yaml.") var state = "/var/lib/palisade-issuer"
    @Option(help: "The trust domain.") var trustDomain = "palisade.local"
    @Option(help: "HOST:PORT to listen on (TLS 1.3).") var listen = "0.0.0.0:15100"
    @Option(help: "Lifetime of node SVIDs, seconds (renewed at half-life; a node past it must join again).") var nodeLifetime = 86400
    @Option(help: "Longest lifetime of workload SVIDs, seconds.") var svidLifetime = 3600
    @Option(help: "An operator configuration with the store: workload SVIDs only for what the store lists on the node, the bundle published for federated domains, federated nodes waited for in a rotation.")
    var config: String?
    @Option(help: "HOST:PORT of the issuer's Prometheus endpoint (loopback by default; 'off' for none).") var metricsAddress = "127.0.0.1:15101"

    func run() throws {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        let log = Logger(label: "palisade.issuer")
        guard let address = HostPort(listen, ports: 0...65535) else { throw CLIError("--listen: expected HOST:PORT, got '\(listen)'") }
        let (host, port) = (address.host, address.port)
        try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let authorities = try Rotation.authorities(state: state, trustDomain: trustDomain)
        let ca = authorities.signing
        let rulesFile = "\(state)/registrations.yaml"
        let view = try config.map { path -> IssuerStoreView in
            guard let sc = try AgentConfig.load(path: path).store else { throw CLIError("--config \(path) has no 'store'") }
            return IssuerStoreView(store: try sc.makeStore(), prefix: sc.prefix, trustDomain: trustDomain,
                                   failed: { log.error("store unreachable; workload SVIDs wait for it", metadata: ["error": "\($0)"]) })
        }
        let issuer = Issuer(ca: ca, tokens: try JoinTokens(directory: "\(state)/tokens"), registrations: try Self.registrations(rulesFile),
                            nodeLifetime: TimeInterval(nodeLifetime), svidLifetime: TimeInterval(svidLifetime),
                            registered: view.map { v in { @Sendable node in v.registered(node: node) } },
                            log: { log.warning("\($0)") })
        issuer.current = authorities
        issuer.reportFile = "\(state)/nodes.json"
        let revokedFile = "\(state)/revoked.json"
        issuer.revoked = RevokedNodes.load(revokedFile)
        let server = try IssuerServer(issuer: issuer, host: host, port: port)
        view?.start()
        var metricsServer: MetricsServer?
        if metricsAddress != "off" {
            guard let m = HostPort(metricsAddress, ports: 0...65535) else { throw CLIError("--metrics-address: expected HOST:PORT or off, got '\(metricsAddress)'") }
            let metrics = IssuerMetrics(issuer: issuer, state: state, store: view)
            metricsServer = try MetricsServer(host: m.host, port: m.port) { metrics.render() }
        }
        log.info("issuer running", metadata: ["trust-domain": "\(trustDomain)", "address": "\(host):\(server.localPort)", "state": "\(state)",
                                              "registrations": "\(issuer.registrations.entries.count)"])
        signal(SIGTERM) { _ in stopRequested = 1 }
        signal(SIGINT) { _ in stopRequested = 1 }
        signal(SIGPIPE, SIG_IGN)
        // The registrations file is read again when it changes; a file with
        // an error leaves the previous rules in force.
        var seen = Self.stamp(rulesFile), seenRevoked = Self.stamp(revokedFile)
        let rotationStamp = { Self.stamp("\(state)/rotation.json") + Self.stamp("\(state)/ca/ca.pem") }
        var seenRotation = rotationStamp()
        var publishedBundle: String?, federated: [String: Issuer.NodeReport]?
        while stopRequested == 0 {
            usleep(500_000)
            if let view {
                // The roots federated nodes must trust, kept in the store
                // (both during a rotation); retried until the store takes it.
                let pem = issuer.bundle.compactMap { try? $0.serializeAsPEM().pemString }.joined(separator: "\n")
                if pem != publishedBundle {
                    do {
                        try runBlocking { try await view.publishBundle(pem) }
                        publishedBundle = pem
                        log.info("bundle published for federated trust domains", metadata: ["key": "\(view.bundleKey)", "roots": "\(issuer.bundle.count)"])
                    } catch {
                        log.error("bundle not published yet", metadata: ["error": "\(error)"])
                    }
                }
                let seen = view.federatedReports()
                if seen != federated, view.mirror.connected {
                    federated = seen
                    try? Rotation.saveFederated(seen, state: state)
                }
            }
            let rotationNow = rotationStamp()
            if rotationNow != seenRotation {
                seenRotation = rotationNow
                do {
                    issuer.current = try Rotation.authorities(state: state, trustDomain: trustDomain)
                    try server.reloadContext()
                    let r = Rotation.load(state)
                    log.warning("root rotation", metadata: ["phase": "\(r.phase.rawValue)", "generation": "\(r.generation)",
                                                            "signing-root": "\(issuer.ca.certificate.serialNumber)"])
                } catch {
                    log.error("rotation state refused; signing as before", metadata: ["error": "\(error)"])
                }
            }
            let revokedNow = Self.stamp(revokedFile)
            if revokedNow != seenRevoked {
                seenRevoked = revokedNow
                issuer.revoked = RevokedNodes.load(revokedFile)
                log.warning("revoked nodes", metadata: ["nodes": "\(issuer.revoked.sorted())"])
            }
            let now = Self.stamp(rulesFile)
            guard now != seen else { continue }
            seen = now
            do {
                issuer.registrations = try Self.registrations(rulesFile)
                log.info("registrations reloaded", metadata: ["entries": "\(issuer.registrations.entries.count)"])
            } catch {
                log.error("registrations refused; the previous ones stay", metadata: ["error": "\(error)"])
            }
        }
        view?.stop()
        metricsServer?.stop()
        server.stop()
    }

    static func registrations(_ path: String) throws -> Registrations {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return Registrations() }
        return try Registrations.parse(text, file: path)
    }

    static func stamp(_ path: String) -> String {
        var st = stat()
        guard stat(path, &st) == 0 else { return "none" }
        return "\(st.st_size)/\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)/\(st.st_ino)"
    }
}

/// `palisade ca join-token --node NAME`: a one-time token for one node,
/// made where the issuer runs (its state directory).
struct CAJoinToken: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "join-token", abstract: "Print a one-time token a node uses to join the issuer.")
    @Option(help: "The issuer's state directory.") var state = "/var/lib/palisade-issuer"
    @Option(help: "The node's name (its SPIFFE ID is spiffe://TD/palisade/node/NAME).") var node: String
    @Option(help: "How long the token is valid: 90s, 10m, 2h.") var ttl = "10m"

    func run() throws {
        guard (try? SpiffeID("spiffe://x/palisade/node/\(node)")) != nil, !node.contains("/") else {
            throw CLIError("--node: '\(node)' is not a valid node name (letters, digits, '.', '-', '_')")
        }
        guard let seconds = Self.duration(ttl), seconds > 0 else { throw CLIError("--ttl: expected a duration like 90s, 10m or 2h, got '\(ttl)'") }
        guard FileManager.default.fileExists(atPath: "\(state)/ca/ca.pem") else {
            throw CLIError("no issuer at \(state) (palisade ca serve --state \(state) creates it)")
        }
        print(try JoinTokens(directory: "\(state)/tokens").create(node: node, ttl: seconds))
    }

    static func duration(_ text: String) -> TimeInterval? {
        guard let unit = text.last, let n = Double(text.dropLast()) else { return Double(text) }
        switch unit {
        case "s": return n
        case "m": return n * 60
        case "h": return n * 3600
        default: return nil
        }
    }
}

/// The issuer's list of revoked nodes (STATE/revoked.json: name -> time).
enum RevokedNodes {
    static func load(_ path: String) -> Set<String> {
        guard let data = FileManager.default.contents(atPath: path),
              let map = try? JSONDecoder().decode([String: Double].self, from: data) else { return [] }
        return Set(map.keys)
    }
}

/// `palisade ca revoke-node --node NAME`: the issuer stops serving that
/// node at once (no join, renewal or workload SVID); with a store in the
/// configuration (the operator's), its etcd user is deleted, its records
/// removed and PREFIX/revoked/NAME written, so every agent drops its
/// workloads and cuts its tunnels when the store tells it (about a second).
struct CARevokeNode: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "revoke-node", abstract: "Revoke a node: no more SVIDs, its tunnels cut by every peer.")
    @Option(help: "The issuer's state directory.") var state = "/var/lib/palisade-issuer"
    @Option(help: "The node's name.") var node: String
    @Option(help: "An operator configuration with the store (etcd root user), to tell every node.") var config: String?

    func run() throws {
        let path = "\(state)/revoked.json"
        var map = (FileManager.default.contents(atPath: path).flatMap { try? JSONDecoder().decode([String: Double].self, from: $0) }) ?? [:]
        map[node] = Date().timeIntervalSince1970
        try JSONEncoder().encode(map).write(to: URL(fileURLWithPath: path), options: .atomic)
        print("issuer: node \(node) revoked (no join, renewal or workload SVID)")
        guard let config else { return }
        guard let sc = try AgentConfig.load(path: config).store else { throw CLIError("\(config) has no 'store'") }
        let etcd = try sc.makeStore()
        let prefix = sc.prefix, name = node
        let summary = try runBlocking { () -> String in
            let record = try await etcd.get("\(prefix)nodes/\(name)")
            let address = record.flatMap { try? JSONSerialization.jsonObject(with: Data($0.value)) as? [String: Any] }?["tunnelAddress"] as? String
            var revoked: [String: Any] = ["node": name, "revokedAt": Date().timeIntervalSince1970]
            if let address { revoked["tunnelAddress"] = address }
            try await etcd.put("\(prefix)revoked/\(name)", Array(try JSONSerialization.data(withJSONObject: revoked)))
            try? await etcd.deleteUser("palisade-node-\(name)")
            try await etcd.delete("\(prefix)nodes/\(name)")
            let workloads = try await etcd.list(prefix: "\(prefix)workloads/\(name)/").kvs
            for kv in workloads { try await etcd.delete(kv.key) }
            return "store: \(prefix)revoked/\(name) written (tunnel address \(address ?? "unknown")), its etcd user and \(workloads.count + (record == nil ? 0 : 1)) records removed"
        }
        print(summary)
    }
}

/// `palisade ca rotate prepare|switch|finish|abort`: a root rotation that
/// drops nothing. prepare makes the new root and publishes both; switch
/// (once every node trusts both) signs with the new one, and every node
/// re-issues its SVIDs within its probe interval; finish (once every node's
/// SVID comes from the new root) retires the old root. abort steps back.
struct CARotate: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "rotate", abstract: "Rotate the trust domain's root, one checked step at a time.")
    enum Step: String, ExpressibleByArgument { case prepare, `switch`, finish, abort }
    @Option(help: "The issuer's state directory.") var state = "/var/lib/palisade-issuer"
    @Argument(help: "prepare, switch, finish or abort.") var step: Step
    @Flag(help: "Skip the check that every node is ready.") var force = false
    @Option(help: "prepare: the next CA directory (ca.pem, ca.key 0600, and root.pem with chain.pem for an intermediate of an offline root); without it a new self-signed root is made.")
    var from: String?

    func run() throws {
        var r = Rotation.load(state)
        guard let current = Rotation.serial("\(state)/ca") else { throw CLIError("no issuer at \(state)") }
        let reports = Rotation.current(Rotation.reports(state))
        switch step {
        case .prepare:
            guard r.phase == .idle else { throw CLIError("a rotation is already \(r.phase.rawValue)") }
            guard let pem = try? String(contentsOfFile: "\(state)/ca/ca.pem", encoding: .utf8), let root = try? Certificate(pemEncoded: pem),
                  let td = (try? root.extensions.subjectAlternativeNames).flatMap({ $0 })?.compactMap({ n -> String? in
                      if case .uniformResourceIdentifier(let u) = n { return u } else { return nil } }).first?.dropFirst("spiffe://".count) else {
                throw CLIError("cannot read the trust domain from \(state)/ca/ca.pem")
            }
            try? FileManager.default.removeItem(atPath: "\(state)/ca-next")
            if let from {
                try FileManager.default.copyItem(atPath: from, toPath: "\(state)/ca-next")
                // (loadOrCreate checks the key's mode and that it matches.)
                let next = try CertificateAuthority.loadOrCreate(directory: "\(state)/ca-next", trustDomain: String(td))
                guard next.trustDomain == String(td) else { throw CLIError("\(from) is a CA of \(next.trustDomain), not \(td)") }
            } else {
                _ = try CertificateAuthority.loadOrCreate(directory: "\(state)/ca-next", trustDomain: String(td))
            }
            r.phase = .prepared
            try r.save(state)
            print("prepared: new root \(Rotation.rootSerial("\(state)/ca-next") ?? "?") published beside \(Rotation.rootSerial("\(state)/ca") ?? current); next: palisade ca rotate switch")
        case .switch:
            guard r.phase == .prepared, let next = Rotation.serial("\(state)/ca-next"), let nextRoot = Rotation.rootSerial("\(state)/ca-next") else {
                throw CLIError("prepare first (phase is \(r.phase.rawValue))")
            }
            let waiting = reports.filter { !$0.value.trusts.contains(nextRoot) }.keys.sorted()
            guard force || (!reports.isEmpty && waiting.isEmpty) else {
                throw CLIError("not every node trusts the new root yet: \(reports.isEmpty ? "no node reported" : waiting.joined(separator: ", ")) (they learn it within 10 s; --force skips this)")
            }
            r.phase = .switched
            r.generation += 1
            try r.save(state)
            print("switched: signing with \(next); every node re-issues its SVIDs; next: palisade ca rotate finish")
        case .finish:
            guard r.phase == .switched, let next = Rotation.serial("\(state)/ca-next") else { throw CLIError("switch first (phase is \(r.phase.rawValue))") }
            let waiting = reports.filter { $0.value.trustDomain == nil && $0.value.nodeSVIDSignedBy != next }.keys.sorted()
            guard force || waiting.isEmpty else {
                throw CLIError("these nodes still hold SVIDs of the old root: \(waiting.joined(separator: ", ")) (--force skips this)")
            }
            let retired = "\(state)/ca-retired-\(Int(Date().timeIntervalSince1970))"
            try FileManager.default.moveItem(atPath: "\(state)/ca", toPath: retired)
            try FileManager.default.moveItem(atPath: "\(state)/ca-next", toPath: "\(state)/ca")
            r.phase = .idle
            try r.save(state)
            print("finished: \(next) is the root; the old one is kept in \(retired)")
        case .abort:
            switch r.phase {
            case .idle: throw CLIError("no rotation to abort")
            case .prepared:
                try? FileManager.default.removeItem(atPath: "\(state)/ca-next")
                r.phase = .idle
                try r.save(state)
                print("aborted: the new root is withdrawn")
            case .switched:
                r.phase = .prepared
                r.generation += 1
                try r.save(state)
                print("rolled back: signing with \(current) again, every node re-issues; abort again to withdraw the new root")
            }
        }
    }
}

/// `palisade ca status`: the rotation's phase and, per node, the roots it
/// trusts and which one signed its node SVID.
struct CAStatus: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "The issuer's roots, rotation phase and nodes.")
    @Option(help: "The issuer's state directory.") var state = "/var/lib/palisade-issuer"

    func run() throws {
        let r = Rotation.load(state)
        guard let current = Rotation.serial("\(state)/ca") else { throw CLIError("no issuer at \(state)") }
        let next = r.phase == .idle ? nil : Rotation.serial("\(state)/ca-next")
        print("phase:      \(r.phase.rawValue) (generation \(r.generation))")
        print("root:       \(current)\(r.phase == .switched ? "" : " (signing)")")
        if let next { print("new root:   \(next)\(r.phase == .switched ? " (signing)" : "")") }
        let (currentRoot, nextRoot) = (Rotation.rootSerial("\(state)/ca"), next == nil ? nil : Rotation.rootSerial("\(state)/ca-next"))
        let name = { (serial: String?) -> String in serial == current ? "root" : serial == next ? "new root" : serial == nil ? "-" : "other" }
        let rootName = { (serial: String?) -> String in serial == currentRoot ? "root" : serial == nextRoot ? "new root" : "other" }
        if let since = r.since, r.phase != .idle { print("since:      \(Int(-since.timeIntervalSinceNow)) s") }
        // Nodes of federated trust domains (seen in the store) say which of
        // this domain's roots they trust; their SVIDs come from their own.
        printTable(["NODE", "LAST SEEN", "TRUSTS", "NODE SVID FROM"], Rotation.reports(state).sorted { $0.key < $1.key }.map { node, rep in
            [node, rep.trustDomain != nil ? "in store" : rep.lastSeen.map { "\(Int(-$0.timeIntervalSinceNow)) s ago" } ?? "-",
             rep.trusts.map(rootName).sorted(by: >).joined(separator: "+"), rep.trustDomain != nil ? "(\(rep.trustDomain ?? ""))" : name(rep.nodeSVIDSignedBy)]
        })
    }
}
