import CPalisadeShared
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import PalisadeBPF
import PalisadeCA
import PalisadeDatapath
import PalisadeDNS
import PalisadeIdentity
import PalisadeIssuer
import PalisadeMetrics
import PalisadePolicy
import PalisadeL7
import PalisadeTunnel
import PalisadeStore
import NIOPosix
import X509
import SwiftASN1

/// The agent's state as other threads (ring buffer, metrics) may read it.
final class StateBox: Sendable {
    private let value: NIOLockedValueBox<AgentState>
    init(_ v: AgentState) { value = NIOLockedValueBox(v) }
    var state: AgentState { value.withLockedValue { $0 } }
    func publish(_ v: AgentState) { value.withLockedValue { $0 = v } }
}

/// The node agent: keeps the kernel in step with the declared workloads and
/// policies. Runs its loop on the calling thread (which matters when that
/// thread was moved into a network namespace).
public final class Agent {
    public let config: AgentConfig
    let log: Logger
    let datapath: Datapath
    var state: AgentState
    var lastFingerprint: String?
    var lastGoodPolicies = PolicySet(policies: [])
    /// The policy set the kernel enforces (empty before the first apply).
    var appliedPolicies = PolicySet(policies: [])
    var lastGoodPolicyFiles: [String] = []
    /// What the kernel was last given (policy text + universe): an unchanged
    /// input is not applied again, so a rejected file changes nothing at all.
    var appliedInput: String?
    var events: FlowEventWriter?
    let shared: StateBox
    public let metrics: AgentMetrics
    var metricsServer: MetricsServer?
    /// Who signs this node's SVIDs: its own CA, or the trust domain's issuer.
    let signer: SVIDSigner
    let svids: SVIDStore
    /// After a failed or refused issuance, the next attempt waits (the
    /// issuer may be down; a refusal will not change by asking every second).
    var nextIssuance = Date.distantPast
    var issuanceBackoff: TimeInterval = 1
    /// The issuer is asked for its bundle this often (liveness for
    /// `palisade status`, and a root it adds reaches the node).
    var nextIssuerProbe = Date.distantPast
    static let issuerProbeInterval: TimeInterval = 10
    /// The issuer's signing generation last seen.
    var issuerGeneration: Int?
    var lastSVIDs = Set<SpiffeID>()
    var inbound: InboundProxy?
    var outbound: OutboundProxy?
    /// The data path's event loops (outbound, mTLS listener, DNS proxy): one
    /// group, so a node carrying both directions runs `eventLoops` relay
    /// threads, not a group per listener competing for the same cores.
    let meshGroup: MultiThreadedEventLoopGroup
    let directory = MeshDirectoryBox()
    /// SPIFFE IDs of this node's workloads (remote ones get no SVID here).
    var localSpiffeIDs = Set<SpiffeID>()
    var lastCompiled: CompiledPolicy?
    var lastGoodHTTP = HTTPRuleSet([])
    var accessLog: AccessLogWriter?
    var storeSync: StoreSync?
    var clusterIdentities: ClusterIdentities?
    /// SPIFFE IDs whose number came from the store (this run).
    var clusterAssigned = Set<SpiffeID>()
    var lastIdentityGC = Date()
    /// Other nodes and their workloads: the configuration's, plus the store's.
    var meshNodes: [MeshNode] = []
    var meshRemoteWorkloads: [RemoteWorkload] = []
    var meshServices: [GlobalService] = []
    /// The trust bundles in force (own CA, configured and store federation).
    let trust = TrustBox()
    /// toFQDNs: what DNS taught, and the proxy that learns it.
    let fqdn: FQDNEgress
    var dnsProxy: DNSProxy?
    /// The universe of the last apply (a DNS answer may need a new generation of it).
    var lastUniverse: Universe?
    var fqdnSavedVersion = -1
    var lastFQDNTick = Date.distantPast

    public init(config: AgentConfig, logger: Logger) throws {
        self.config = config
        log = logger
        meshGroup = MultiThreadedEventLoopGroup(numberOfThreads: config.eventLoops)
        var http = HTTPLimits()
        http.requestHeadTimeout = .milliseconds(Int64(config.httpRequestHeadTimeoutMilliseconds))
        http.bodyIdleTimeout = .milliseconds(Int64(config.httpBodyIdleTimeoutMilliseconds))
        HTTPLimits.current = http
        let files = FileDescriptors.raiseLimit()
        log.info("file descriptors", metadata: ["limit": "\(files)"])
        try FileManager.default.createDirectory(atPath: config.stateDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        for d in [config.resolvedPolicyDir, config.resolvedWorkloadDir] {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        }
        state = AgentState.load(config.stateFile) ?? AgentState()
        if let issuer = config.issuer {
            // The bundle last learned from the issuer (kept through root
            // rotations) wins over the one the operator first gave.
            let learned = "\(config.stateDir)/issuer-bundle.pem"
            let bundleFile = FileManager.default.fileExists(atPath: learned) ? learned : issuer.bundleFile
            let bundle: [Certificate]
            do {
                bundle = try PEMDocument.parseMultiple(pemString: String(contentsOfFile: bundleFile, encoding: .utf8)).map { try Certificate(pemDocument: $0) }
            } catch { throw CAError("issuer bundle \(bundleFile): \(error)") }
            guard !bundle.isEmpty else { throw CAError("issuer bundle \(issuer.bundleFile) holds no certificate") }
            let nodeID = config.nodeSpiffeID, svidDir = config.svidDir, tokenFile = issuer.joinTokenFile
            let client = IssuerClient(addresses: issuer.addresses, nodeID: nodeID, bundle: bundle,
                                      credentials: { SVIDStore.credentials(nodeID, directory: svidDir) },
                                      joinToken: { tokenFile.flatMap { try? String(contentsOfFile: $0, encoding: .utf8) }?.trimmingCharacters(in: .whitespacesAndNewlines) })
            client.onBundleChange = { pem in try? pem.write(toFile: learned, atomically: true, encoding: .utf8) }
            signer = client
        } else {
            signer = try CertificateAuthority.loadOrCreate(directory: config.caDir, trustDomain: config.trustDomain)
        }
        svids = try SVIDStore(directory: config.svidDir, signer: signer, lifetime: TimeInterval(config.svidLifetimeSeconds))
        datapath = try Datapath(pinRoot: config.bpffs)
        let gen = datapath.maps.activeConfig.generation
        log.info("datapath loaded", metadata: ["bpffs": "\(config.bpffs)", "adopted-generation": "\(gen)",
                                               "tc-programs": "\(datapath.fromPod.id),\(datapath.toPod.id)"])
        try datapath.setEvents(perSecond: config.eventsPerSecond, allowedFlows: config.allowedFlowEvents)
        let cache = FQDNCache(limits: config.fqdn)
        // What DNS taught before a restart stays allowed (the kernel kept it
        // enforced meanwhile); the names are learned again as lookups come.
        cache.restore(FQDNEgress.load(config.fqdnFile))
        fqdn = FQDNEgress(cache: cache, datapath: datapath, log: logger, file: config.fqdnFile)
        let shared = StateBox(state)
        self.shared = shared
        let metrics = AgentMetrics(maps: datapath.maps, maxPairs: config.metricsIdentityPairs)
        self.metrics = metrics
        events = try FlowEventWriter(maps: datapath.maps, path: config.eventLog, socket: config.flowSocket, names: { shared.state }, metrics: metrics)
        if let (host, port) = config.metricsAddress {
            let capacities = ["conntrack": Int(PAL_MAX_CONNTRACK), "policy": Int(PAL_MAX_POLICY), "ipcache": Int(PAL_MAX_IPCACHE),
                              "defaults": Int(PAL_MAX_DEFAULTS), "peer_class": Int(PAL_MAX_PEER_CLASS), "endpoints_by_ifindex": Int(PAL_MAX_ENDPOINTS),
                              "endpoints_by_cgroup": Int(PAL_MAX_ENDPOINTS)]
            metricsServer = try MetricsServer(host: host, port: port,
                                              refused: { metrics.recordAdminRefusal(endpoint: "metrics", reason: $0.rawValue) }) {
                metrics.setFiles(open: FileDescriptors.inUse, max: FileDescriptors.limit)
                return metrics.render(names: { shared.state.name(of: $0) }, peerNames: { shared.state.peerName(of: $0) }, capacities: capacities)
            }
            log.info("metrics", metadata: ["address": "http://\(HostPort(host: host, port: metricsServer?.localPort ?? port))/metrics"])
        }
        trust.set(try verifier())
        let bearer = try BearerTokens.verifier(issuers: config.jwtIssuers)
        directory.update { $0.verifyBearer = bearer }
        try startMesh()
        try startDNSProxy()
        if let sc = config.store {
            let sync = StoreSync(store: try sc.makeStore(), prefix: sc.prefix, node: config.nodeSpiffeID.path.split(separator: "/").last.map(String.init) ?? "node", log: log,
                                 cachePath: "\(config.stateDir)/store-cache.json")
            sync.start()
            storeSync = sync
            clusterIdentities = ClusterIdentities(store: sync.store, prefix: "\(sc.prefix)identities/")
            log.info("shared store", metadata: ["etcd": "\(sc.endpoints.joined(separator: ","))", "prefix": "\(sc.prefix)"])
        }
    }

    /// Reconciles until stop() returns true.
    public func run(until stop: () -> Bool) {
        events?.start()
        var lastGC = Date()
        var gcInterval = 30.0
        var releasePagesAt: Date? = config.releaseCodePages ? Date().addingTimeInterval(10) : nil
        var lastMemoryRelease = Date()
        while !stop() {
            if reconcileIfChanged() && config.releaseCodePages {
                // A policy compile touched code the data path does not use.
                releasePagesAt = Date().addingTimeInterval(10)
            }
            rotateSVIDs()
            if config.memoryReleaseSeconds > 0 && Date().timeIntervalSince(lastMemoryRelease) >= Double(config.memoryReleaseSeconds) {
                // What a burst used (a bulk transfer's buffers, connection
                // set-up code) goes back; the data path faults back what it uses.
                lastMemoryRelease = Date()
                let r = FreeHeap.release()
                log.debug("released free heap pages", metadata: ["anonymous kB before": "\(r.beforeKB)", "after": "\(r.afterKB)", "us": "\(r.micros)"])
                if config.releaseCodePages { releasePagesAt = Date() }
            }
            if let at = releasePagesAt, Date() >= at {
                releasePagesAt = nil
                let kb = CodePages.release()
                log.debug("released code pages", metadata: ["kB": "\(kb)"])
            }
            if Date().timeIntervalSince(lastGC) > gcInterval {
                lastGC = Date()
                do {
                    let (removed, remaining) = try datapath.collectConntrackGarbage()
                    // Under connection churn, collect often enough that closed
                    // flows, not live ones, make room in the LRU.
                    gcInterval = remaining > Int(PAL_MAX_CONNTRACK) / 4 ? 3 : 30
                    if removed > 0 { log.debug("conntrack garbage collected", metadata: ["entries": "\(removed)", "remaining": "\(remaining)"]) }
                } catch {
                    log.error("conntrack garbage collection failed", metadata: ["error": "\(error)"])
                }
            }
            var waited = 0
            while waited < config.pollIntervalMilliseconds && !stop() {
                usleep(50_000)
                waited += 50
                tickFQDN()
            }
        }
        dnsProxy?.stop()
        fqdn.save(config.fqdnFile)
        events?.stop()
        storeSync?.stop()
        metricsServer?.stop()
        inbound?.stop()
        outbound?.stop()
        try? meshGroup.syncShutdownGracefully()
        accessLog?.flush()
        log.info("agent stopping; programs and maps stay pinned and keep enforcing")
    }

    /// Cheap change detection: names, sizes, mtimes and inodes of the
    /// watched files plus the node's addresses. Contents are read only when
    /// this changes, so an idle agent costs next to nothing.
    func fingerprint() -> String {
        var parts: [String] = []
        for dir in [config.resolvedWorkloadDir, config.resolvedPolicyDir] {
            parts.append(dir)
            for name in ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted() {
                var st = stat()
                guard stat("\(dir)/\(name)", &st) == 0 else { continue }
                parts.append("\(name)/\(st.st_size)/\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)/\(st.st_ino)")
            }
        }
        parts.append(hostAddresses().map(\.description).joined(separator: ","))
        if let s = storeSync { parts.append("store/\(s.version)") }
        return parts.joined(separator: "\u{0}")
    }

    /// True when something changed and was reconciled.
    @discardableResult
    public func reconcileIfChanged() -> Bool {
        let fp = fingerprint()
        if fp == lastFingerprint { return false }
        lastFingerprint = fp
        reconcile(workloadFiles: readYAMLDirectory(config.resolvedWorkloadDir),
                  policyFiles: readYAMLDirectory(config.resolvedPolicyDir) + (storeSync?.policies() ?? []))
        return true
    }

    /// Issues or re-issues (at half-life) the SVIDs of every enrolled
    /// identity and of the node itself. Keys are never logged.
    func rotateSVIDs() {
        var ids = localSpiffeIDs
        ids.insert(config.nodeSpiffeID)
        probeIssuer()
        guard Date() >= nextIssuance else { return }
        do {
            let issued = try svids.ensure(ids, first: config.nodeSpiffeID)
            for (id, reason) in svids.refused.sorted(by: { $0.key < $1.key }) {
                log.error("svid refused", metadata: ["spiffe-id": "\(id)", "reason": "\(reason)"])
            }
            if !issued.isEmpty || !svids.refused.isEmpty { recordIssuer(error: nil) }
            backOff(svids.refused.isEmpty ? nil : "refused")
            if issued.contains(config.nodeSpiffeID) || (inbound == nil && config.tunnelAddress != nil) { try startOrReloadListener() }
            // A new node SVID: the issuer hears from this node (which roots
            // it trusts) at once, not at the next probe.
            if issued.contains(config.nodeSpiffeID) { nextIssuerProbe = .distantPast }
            for id in issued {
                let info = svids.cached(id)
                log.info("svid issued", metadata: ["spiffe-id": "\(id)", "serial": "\(info?.serial ?? "?")",
                                                   "not-after": "\(info.map { UTCTime.string($0.notAfter) } ?? "?")"])
            }
            for id in ids { metrics.setCertificateExpiry(spiffeID: id.description, notAfter: svids.cached(id)?.notAfter) }
            for gone in lastSVIDs.subtracting(ids) { metrics.setCertificateExpiry(spiffeID: gone.description, notAfter: nil) }
            lastSVIDs = ids
            if !issued.isEmpty { publishCredentials() }
        } catch {
            log.error("svid issuance failed", metadata: ["error": "\(error)", "retry-in-seconds": "\(Int(issuanceBackoff))"])
            recordIssuer(error: "\(error)")
            backOff("failed")
        }
    }

    /// Asks the issuer for its bundle every few seconds (nodes with one).
    func probeIssuer() {
        guard let client = signer as? IssuerClient, Date() >= nextIssuerProbe else { return }
        nextIssuerProbe = Date().addingTimeInterval(Self.issuerProbeInterval)
        do {
            let before = client.bundle
            let generation = try client.probe()
            // A root learned just now is reported back at once (the issuer
            // waits for every node to trust it before it switches).
            if client.bundle != before { nextIssuerProbe = .distantPast }
            // Back: what failed meanwhile is tried again now.
            if state.issuer?.reachable == false { nextIssuance = .distantPast; issuanceBackoff = 1 }
            // A root the issuer added (rotation) is trusted from now on.
            refreshTrust()
            // The issuer signs with a new key: every SVID is re-issued now,
            // not at half-life, so the old root can be retired.
            if let seen = issuerGeneration, seen != generation {
                log.info("issuer switched its signing key; re-issuing every SVID", metadata: ["generation": "\(generation)"])
                svids.renewAll()
                nextIssuance = .distantPast
                issuanceBackoff = 1
            }
            issuerGeneration = generation
            recordIssuer(error: nil)
        } catch {
            recordIssuer(error: "\(error)")
        }
    }

    /// The issuer's status in the state file (`palisade status`).
    func recordIssuer(error: String?) {
        guard let issuer = config.issuer else { return }
        var s = state.issuer ?? AgentState.IssuerStatus(address: issuer.addresses.map(\.description).joined(separator: ","), reachable: false)
        let before = s
        s.reachable = error == nil
        if error == nil { s.lastContact = Date() } else { s.lastError = error }
        if error == nil { s.refused = Dictionary(uniqueKeysWithValues: svids.refused.map { ($0.key.description, $0.value) }) }
        state.issuer = s
        if s.reachable != before.reachable || s.refused != before.refused {
            if s.reachable { log.info("issuer reachable", metadata: ["address": "\(s.address)"]) }
            else { log.error("issuer unreachable; SVIDs in hand stay in use until they expire", metadata: ["address": "\(s.address)", "error": "\(error ?? "")"]) }
            saveState()
        }
    }

    /// Doubles the wait before the next issuance attempt (to a minute) after
    /// a failure or refusal; a clean round resets it.
    func backOff(_ why: String?) {
        guard why != nil else { issuanceBackoff = 1; nextIssuance = .distantPast; return }
        nextIssuance = Date().addingTimeInterval(issuanceBackoff)
        issuanceBackoff = min(issuanceBackoff * 2, 60)
    }

    /// Where the L7 proxy's requests go, on both sides: metrics, and one
    /// JSON line per request (sampled) in the access log, opened on first use.
    func accessLogSink() -> HTTPRecorderFactory {
        let path = config.accessLogPath, metrics = self.metrics
        if accessLog == nil {
            accessLog = AccessLogWriter(path: path)
            accessLog?.onDrop = { n in metrics.recordAccessLogDropped(n) }
            if accessLog == nil { log.error("cannot open the access log", metadata: ["path": "\(path)", "error": "\(String(cString: strerror(errno)))"]) }
        }
        let sampling = config.accessLogSampling, writer = accessLog
        return { source, destination in
            let recorder = HTTPRequestRecorder(metrics: metrics.httpConnection(source: source, destination: destination),
                                               writer: writer, sampling: sampling)
            return { entry in recorder.record(entry) }
        }
    }

    func startOrReloadListener() throws {
        guard let (host, port) = config.tunnelAddress, let node = svids.cached(config.nodeSpiffeID) else { return }
        if let inbound {
            try inbound.reload(certificateFile: node.certificateFile, keyFile: node.keyFile)
            return
        }
        let l = try InboundProxy(host: host, port: port, certificateFile: node.certificateFile, keyFile: node.keyFile, verifier: trust.current,
                                 group: meshGroup)
        let log = self.log, metrics = self.metrics, directory = self.directory
        l.onReject = { reason in log.warning("mTLS peer certificate refused", metadata: ["reason": "\(reason)"]) }
        l.authorize = { Agent.authorizeInbound($0, directory: directory.current) }
        l.accessLog = accessLogSink()
        l.onStream = { request, decision, error in
            var delivered = false
            switch decision {
            case .deliver, .deliverHTTP: delivered = error == nil
            case .refuse: break
            }
            metrics.recordTunnelStream(delivered: delivered)
            if !delivered {
                var reason = error ?? ""
                if case .refuse(let status, let r) = decision { reason = "\(status) \(r)" + (error.map { ": \($0)" } ?? "") }
                log.warning("tunnel stream refused", metadata: ["source": "\(request.peer)", "destination": "\(request.host):\(request.port)", "reason": "\(reason)"])
            }
        }
        l.onHandshakeFailure = { metrics.recordHandshake(accepted: false) }
        l.limits = HandshakeLimits(timeout: .milliseconds(Int64(config.handshakeTimeoutMilliseconds)),
                                   maxPending: config.maxPendingHandshakes, maxPendingPerSource: config.maxPendingHandshakesPerSource)
        l.onRefuse = { reason in metrics.recordHandshakeRefusal(reason.rawValue) }
        l.tunnelTimeouts = TunnelTimeouts(connectionIdle: .seconds(Int64(config.tunnelConnectionIdleSeconds)),
                                          streamIdle: .seconds(Int64(config.tunnelStreamIdleSeconds)))
        l.onAccept = { _ in metrics.recordHandshake(accepted: true) }
        inbound = l
        log.info("mTLS listener", metadata: ["address": "\(host):\(l.localPort)", "identity": "\(config.nodeSpiffeID)", "tls": "1.3 only"])
    }

    func hostAddresses() -> [IPAddress] {
        config.hostAddresses ?? HostAddresses.discover()
    }

    func reconcile(workloadFiles: [(name: String, text: String)], policyFiles: [(name: String, text: String)]) {
        // Workloads: a bad file is reported and skipped; the others proceed.
        var workloads: [Workload] = config.workloads
        var workloadErrors: [String] = []
        var seen = Set(config.workloads.map(\.name))
        for f in workloadFiles {
            do {
                for w in try Workload.parse(f.text, file: f.name, trustDomain: config.trustDomain) {
                    if seen.contains(w.name) { workloadErrors.append("\(w.source): workload '\(w.name)' is enrolled twice"); continue }
                    seen.insert(w.name)
                    workloads.append(w)
                }
            } catch {
                workloadErrors.append("\(error)")
            }
        }
        for e in workloadErrors { log.error("workload rejected", metadata: ["error": "\(e)"]) }
        state.workloadErrors = workloadErrors

        // Policies: any error keeps the last good set in force.
        do {
            lastGoodPolicies = try PolicySet.load(policyFiles)
            lastGoodHTTP = try HTTPRuleSet.load(policyFiles)
            if config.jwtIssuers.isEmpty, lastGoodHTTP.namesJWTIdentities {
                log.warning("HTTP rules name JWT identities but no jwtIssuers are configured: every bearer token counts as unverified")
            }
            lastGoodPolicyFiles = policyFiles.map(\.name)
            state.policy.lastError = nil
            metrics.setPolicyValid(true)
        } catch {
            state.policy.lastError = "\(error)"
            state.policy.lastErrorAt = Date()
            metrics.setPolicyValid(false)
            metrics.recordApply(seconds: 0, generation: 0, ok: false)
            log.error("policy rejected; the last good policy stays in force", metadata: ["error": "\(error)"])
        }

        // Peers and trust from the store, then identities (cluster-wide numbers when shared).
        mergeStorePeers()
        refreshTrust()
        allocateClusterIdentities(local: workloads.map(\.spiffeID), remote: meshRemoteWorkloads.map(\.spiffeID))
        var universe = Universe(workloads: [:], hostAddresses: hostAddresses())
        var records: [UInt32: AgentState.IdentityRecord] = [:]
        for w in workloads {
            let id = state.allocator.identity(for: w.spiffeID)
            if var existing = universe.workloads[id] {
                if existing.labels != w.labels || existing.namespace != w.namespace
                    || existing.namespaceLabels.filter({ $0.key != "kubernetes.io/metadata.name" }) != w.namespaceLabels.filter({ $0.key != "kubernetes.io/metadata.name" }) {
                    log.error("workloads sharing a SPIFFE ID must share labels and namespace", metadata: ["workload": "\(w.name)", "spiffeID": "\(w.spiffeID)"])
                    state.workloadErrors.append("\(w.source): workload '\(w.name)' shares \(w.spiffeID) with different labels or namespace")
                    continue
                }
                existing.addresses += w.addresses
                existing.ports = NamedPort.union(existing.ports, w.ports)
                universe.workloads[id] = existing
            } else {
                universe.workloads[id] = WorkloadIdentity(spiffeID: w.spiffeID, labels: w.labels, namespace: w.namespace,
                                                          namespaceLabels: Self.namespaceLabels(w.namespaceLabels, of: w.namespace),
                                                          addresses: w.addresses, ports: w.ports)
            }
            records[id.rawValue] = .init(spiffeID: w.spiffeID, namespace: w.namespace, labels: w.labels)
        }
        localSpiffeIDs = Set(workloads.map(\.spiffeID))
        for r in meshRemoteWorkloads {
            let id = state.allocator.identity(for: r.spiffeID)
            if var existing = universe.workloads[id] {
                existing.addresses += r.addresses
                existing.remoteAddresses.formUnion(r.addresses)
                existing.ports = NamedPort.union(existing.ports, r.ports)
                universe.workloads[id] = existing
            } else {
                let nsLabels = Self.namespaceLabels(r.namespaceLabels, of: r.namespace)
                // Only on other nodes: a peer here, its own node enforces its policy.
                universe.workloads[id] = WorkloadIdentity(spiffeID: r.spiffeID, labels: r.labels, namespace: r.namespace,
                                                          namespaceLabels: nsLabels, addresses: r.addresses, remoteAddresses: Set(r.addresses),
                                                          isLocal: false, ports: r.ports)
            }
            records[id.rawValue] = .init(spiffeID: r.spiffeID, namespace: r.namespace, labels: r.labels)
        }
        // A global service's virtual IP carries its endpoints' identity (they
        // share one: the same app wherever it runs) and is redirected to the
        // agent like a remote workload, which picks the endpoint.
        for svc in meshServices {
            guard let (id, _) = universe.workloads.sorted(by: { $0.key < $1.key })
                .first(where: { e in svc.selector.allSatisfy { e.value.labels[$0.key] == $0.value } }) else { continue }
            universe.workloads[id]?.addresses.append(svc.vip)
            universe.workloads[id]?.remoteAddresses.insert(svc.vip)
        }
        state.allocator.retain(only: localSpiffeIDs.union(meshRemoteWorkloads.map(\.spiffeID)))
        publishToStore(workloads)
        state.identities = records

        let wanted = workloads.filter { w in universe.workloads[state.allocator.identity(for: w.spiffeID)] != nil }
        detachRemoved(wanted)
        let input = "\(lastGoodPolicies.policies)\u{0}\(universe.workloads.sorted { $0.key < $1.key })\u{0}\(universe.hostAddresses)"
        if input != appliedInput {
            applyPolicy(universe: universe)
            appliedInput = input
        }
        attach(wanted)
        saveState()
        publishDirectory(universe: universe, compiled: lastCompiled)
        publishCredentials()
        syncL7Ports(universe: universe)
    }

    func applyPolicy(universe: Universe) {
        lastUniverse = universe
        do {
            // Compiled and applied with what DNS taught up to now, with no
            // learned-address write in between (see FQDNEgress.install).
            let (compiled, r) = try datapath.exclusively {
                let start = Date()
                var universe = universe
                universe.learned = fqdn.cache.snapshot()
                let compiled = try PolicyCompiler.compile(lastGoodPolicies, universe: universe)
                state.policy.compileSeconds = Date().timeIntervalSince(start)
                let lookup = CompiledLookup(compiled)
                let r = try datapath.apply(compiled, lookup: lookup, keepFlowsTo: fqdn.cache.retiredAddresses())
                fqdn.installed.withLockedValue { $0 = lookup }
                return (compiled, r)
            }
            installed(compiled, result: r, policies: lastGoodPolicies)
            appliedPolicies = lastGoodPolicies
            state.policy.notInstalled = nil
            state.policy.lockedDown = nil
            metrics.setPolicyInstalled(true, lockedDown: 0)
            log.info("policy applied", metadata: [
                "generation": "\(r.generation)", "policies": "\(lastGoodPolicies.policies.count)",
                "entries": "\(r.policyEntries)", "peer-classes": "\(r.peerClassEntries)", "ipcache": "\(r.ipcacheEntries)",
                "conntrack-flushed": "\(r.conntrackFlushed)", "compile-ms": "\(Int(state.policy.compileSeconds * 1000))",
                "ms": "\(Int(r.seconds * 1000))"])
        } catch {
            state.policy.lastError = "\(error)"
            state.policy.lastErrorAt = Date()
            state.policy.notInstalled = "\(error)"
            metrics.recordApply(seconds: 0, generation: 0, ok: false)
            log.error("policy apply refused; the policy in force stays", metadata: ["error": "\(error)"])
            installFallback(universe: universe)
        }
    }

    /// When the declared policy cannot be installed: the policy in force
    /// stays, compiled over the current workloads (so the ipcache and peer
    /// classes follow them: callers are not dropped as spoofed), and every
    /// workload the refused policy selects that it would leave unenforced
    /// (all of them at a first start) is held at default deny.
    func installFallback(universe: Universe) {
        do {
            let (fallback, locked, r) = try datapath.exclusively {
                var universe = universe
                universe.learned = fqdn.cache.snapshot()
                var fallback = try PolicyCompiler.compile(appliedPolicies, universe: universe)
                let locked = PolicyCompiler.lockDown(&fallback, selectedBy: lastGoodPolicies, universe: universe)
                let lookup = CompiledLookup(fallback)
                let r = try datapath.apply(fallback, lookup: lookup, keepFlowsTo: fqdn.cache.retiredAddresses())
                fqdn.installed.withLockedValue { $0 = lookup }
                return (fallback, locked, r)
            }
            installed(fallback, result: r, policies: appliedPolicies)
            let names = locked.compactMap { universe.workloads[$0]?.spiffeID.description }.sorted()
            state.policy.lockedDown = names
            metrics.setPolicyInstalled(false, lockedDown: locked.count)
            log.error("workloads held at default deny until their policy can be installed", metadata: [
                "locked-down": "\(names.joined(separator: ","))", "generation": "\(r.generation)"])
        } catch {
            metrics.setPolicyInstalled(false, lockedDown: 0)
            log.error("the previous policy could not be carried over either; the kernel is unchanged", metadata: ["error": "\(error)"])
        }
    }

    /// Records what the kernel now holds.
    func installed(_ compiled: CompiledPolicy, result r: Datapath.ApplyResult, policies: PolicySet) {
        lastCompiled = compiled
        state.rules = compiled.rules
        state.cidrIdentities = Dictionary(uniqueKeysWithValues: compiled.cidrIdentities.map { ($0.key.description, $0.value.rawValue) })
        state.peerClasses = Dictionary(uniqueKeysWithValues: compiled.classSelectors.map { ($0.key.rawValue, $0.value) })
        state.fqdnClasses = Dictionary(uniqueKeysWithValues: compiled.fqdnClasses.map { ($0.value.rawValue, $0.key.map(\.description).sorted()) })
        state.fqdnSelectors = compiled.fqdnSelectors
        state.policy.generation = r.generation
        state.policy.appliedAt = Date()
        state.policy.files = lastGoodPolicyFiles
        state.policy.policies = policies.policies.count
        state.policy.policyEntries = r.policyEntries
        state.policy.peerClassEntries = r.peerClassEntries
        state.policy.defaultEntries = r.defaultEntries
        state.policy.applySeconds = r.seconds
        metrics.recordApply(seconds: r.seconds, generation: r.generation, ok: true)
    }

    func cgroupPath(_ p: String) -> String? {
        if p.hasPrefix("/") { return p }
        return config.resolvedCgroupRoot.map { "\($0)/\(p)" }
    }

    func attach(_ workloads: [Workload]) {
        var records: [AgentState.EndpointRecord] = []
        for w in workloads {
            let id = state.allocator.identity(for: w.spiffeID)
            do {
                let mode = w.mtls
                var record: AgentState.EndpointRecord
                switch w.attachment {
                case .pod(let ifname):
                    let ifindex = try datapath.attachPod(interface: ifname, identity: id, mtls: mode)
                    record = .init(workload: w.name, identity: id, interface: ifname, ifindex: ifindex)
                case .cgroup(let p):
                    guard let path = cgroupPath(p) else { throw DatapathError("no cgroup2 mount found; set cgroupRoot") }
                    let cg = try datapath.attachCgroup(path: path, identity: id, mtls: mode)
                    record = .init(workload: w.name, identity: id, cgroupPath: path, cgroupID: cg)
                }
                record.mtls = mode.rawValue
                // Socket redirection to the tunnel: the workload's processes, by cgroup.
                let redirectPath: String? = {
                    if case .cgroup(let p) = w.attachment { return self.cgroupPath(p) }
                    return w.podCgroup.flatMap { self.cgroupPath($0) }
                }()
                if mode != .disabled, let port = config.outboundPort, let path = redirectPath {
                    guard let listener = outboundListener(for: w, port: port) else {
                        throw DatapathError("interface of \(w.name) has no IPv4 address for the outbound listener")
                    }
                    record.redirectCgroupID = try datapath.attachRedirect(cgroupPath: path, identity: id, listener: listener)
                } else if let old = state.endpoints.first(where: { $0.workload == w.name })?.redirectCgroupID {
                    try? datapath.detachRedirect(cgroupID: old)
                }
                records.append(record)
            } catch {
                state.workloadErrors.append("\(w.source): workload '\(w.name)' could not be attached: \(error)")
                log.error("workload not attached", metadata: ["workload": "\(w.name)", "error": "\(error)"])
            }
        }
        if records.count != state.endpoints.count || Set(records) != Set(state.endpoints) {
            log.info("endpoints", metadata: ["count": "\(records.count)"])
        }
        state.endpoints = records
    }

    func detachRemoved(_ workloads: [Workload]) {
        let wantedPods = Set(workloads.compactMap { w -> String? in if case .pod(let i) = w.attachment { return i }; return nil })
        let wantedCgroups = Set(workloads.compactMap { w -> String? in if case .cgroup(let p) = w.attachment { return cgroupPath(p) }; return nil })
        let wantedNames = Set(workloads.map(\.name))
        for e in state.endpoints {
            if let r = e.redirectCgroupID, !wantedNames.contains(e.workload) { try? datapath.detachRedirect(cgroupID: r) }
            if let i = e.interface, let idx = e.ifindex, !wantedPods.contains(i) {
                try? datapath.detachPod(ifindex: idx)
                log.info("workload removed", metadata: ["workload": "\(e.workload)"])
            }
            if let p = e.cgroupPath, let cg = e.cgroupID, !wantedCgroups.contains(p) {
                try? datapath.detachCgroup(id: cg)
                log.info("workload removed", metadata: ["workload": "\(e.workload)"])
            }
        }
    }

    func saveState() {
        state.files = .init(open: FileDescriptors.inUse, limit: FileDescriptors.limit)
        shared.publish(state)
        metrics.setWorkloads(state.endpoints.count)
        do { try state.save(config.stateFile) } catch {
            log.error("cannot write state", metadata: ["path": "\(config.stateFile)", "error": "\(error)"])
        }
    }

    /// Removes everything Palisade installed for this configuration.
    public static func cleanup(config: AgentConfig, logger: Logger) {
        let state = AgentState.load(config.stateFile) ?? AgentState()
        Datapath.removeAll(pinRoot: config.bpffs, podIfindexes: state.endpoints.compactMap(\.ifindex))
        var cleared = state
        cleared.endpoints = []
        try? cleared.save(config.stateFile)
        logger.info("removed Palisade's programs, links and pinned maps", metadata: ["bpffs": "\(config.bpffs)"])
    }
}

