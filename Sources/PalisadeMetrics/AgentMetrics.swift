import CPalisadeShared
import Foundation
import PalisadeIdentity
import PalisadeBPF
import PalisadeDatapath
import PalisadePolicy
import Prometheus

/// Names for identities, supplied by the agent (thread-safe snapshot).
public typealias IdentityNamer = @Sendable (UInt32) -> String

/// The agent's Prometheus metrics. Kernel counters are read and summed over
/// CPUs at scrape time and exported as counters (by delta, so they stay
/// monotonic); per identity pair series are bounded: past `maxPairs`
/// distinct pairs, further traffic is counted under local="other",
/// peer="other", so a scan cannot explode the series count.
public final class AgentMetrics: @unchecked Sendable {
    public let registry = PrometheusCollectorRegistry()
    let lock = NSLock()
    let maps: PalisadeMaps
    let maxPairs: Int

    var packetCounters: [String: (Counter, UInt64)] = [:]
    var byteCounters: [String: (Counter, UInt64)] = [:]
    var suppressed: (Counter, UInt64)
    var lost: (Counter, UInt64)
    var pairCounters: [String: Counter] = [:]
    var ruleHits: [String: UInt64] = [:]       // (generation slot + key bytes) -> packets last read
    var mapEntries: [String: Gauge] = [:]
    var mapCapacity: [String: Gauge] = [:]
    let applies: Counter
    let applyFailures: Counter
    let applyDuration: DurationHistogram
    let generation: Gauge
    let policyValid: Gauge
    let workloads: Gauge
    let eventsTotal: [String: Counter]

    public init(maps: PalisadeMaps, maxPairs: Int = 200) {
        self.maps = maps
        self.maxPairs = maxPairs
        suppressed = (registry.counter("palisade_flow_events_suppressed_total",
                                           help: "Deny events the kernel did not send because its per-CPU rate limit was reached."), 0)
        lost = (registry.counter("palisade_flow_events_lost_total",
                                     help: "Deny events lost because the ring buffer was full."), 0)
        applies = registry.counter("palisade_policy_applies_total", help: "Policy generations written to the kernel.")
        applyFailures = registry.counter("palisade_policy_apply_failures_total",
                                             help: "Policy loads or applies refused (the previous policy stayed in force).")
        applyDuration = registry.durationHistogram(
            "palisade_policy_apply_duration_seconds",
            buckets: [.milliseconds(5), .milliseconds(25), .milliseconds(100), .milliseconds(250), .seconds(1), .seconds(5)],
            help: "Time to write a policy generation, flip and sweep conntrack.")
        generation = registry.gauge("palisade_policy_generation", help: "Policy generation in force in the kernel.")
        policyValid = registry.gauge("palisade_policy_valid", help: "1 if the last policy load succeeded, 0 if a file was rejected.")
        workloads = registry.gauge("palisade_workloads", help: "Workloads attached to the datapath.")
        let registry = self.registry
        eventsTotal = Dictionary(uniqueKeysWithValues: Outcome.allCases.map(\.rawValue).map { v in
            (v, registry.counter("palisade_flow_events_total", labels: [("verdict", v)],
                                     help: "Flow events received from the kernel."))
        })
    }

    // MARK: agent events

    public func recordApply(seconds: Double, generation gen: UInt64, ok: Bool) {
        if ok {
            applies.increment()
            applyDuration.recordNanoseconds(Int64(seconds * 1e9))
            generation.set(to: Double(gen))
        } else {
            applyFailures.increment()
        }
    }

    var certificateExpiry: [String: Gauge] = [:]
    lazy var handshakesAccepted = registry.counter("palisade_tls_handshakes_total", labels: [("result", "accepted")],
                                                       help: "mTLS handshakes on the agent's listener, by result.")
    lazy var handshakesRefused = registry.counter("palisade_tls_handshakes_total", labels: [("result", "refused")],
                                                      help: "mTLS handshakes on the agent's listener, by result.")

    /// Counters by result, made on first use.
    private var resultCounters: [String: Counter] = [:]
    private func result(_ name: String, _ result: String, _ help: String) -> Counter {
        lock.withLock {
            if let c = resultCounters["\(name)|\(result)"] { return c }
            let c = registry.counter(name, labels: [("result", result)], help: help)
            resultCounters["\(name)|\(result)"] = c
            return c
        }
    }

    /// A connection refused or closed before its TLS handshake completed.
    public func recordHandshakeRefusal(_ reason: String) {
        result("palisade_listener_refused_connections_total", reason,
               "Connections to the mTLS listener refused or closed before their handshake completed, by reason.").increment()
    }

    /// A connection to an admin endpoint (metrics, flows socket) refused or
    /// cut, by endpoint and reason.
    public func recordAdminRefusal(endpoint: String, reason: String) {
        lock.withLock {
            let key = "admin|\(endpoint)|\(reason)"
            if let c = resultCounters[key] { return c }
            let c = registry.counter("palisade_admin_refused_connections_total", labels: [("endpoint", endpoint), ("reason", reason)],
                                         help: "Connections to an admin endpoint (metrics, flows socket) refused or cut, by endpoint and reason.")
            resultCounters[key] = c
            return c
        }.increment()
    }

    lazy var openFiles = registry.gauge("palisade_open_files", help: "File descriptors the agent holds.")
    lazy var maxFiles = registry.gauge("palisade_max_files", help: "The agent's file-descriptor limit (RLIMIT_NOFILE, raised to the hard limit at start).")
    public func setFiles(open: Int, max: Int) {
        lock.lock(); let o = openFiles, m = maxFiles; lock.unlock()
        o.set(to: Double(open))
        m.set(to: Double(max))
    }

    public func recordTunnelConnection(ok: Bool) {
        result("palisade_tunnel_outbound_connections_total", ok ? "tunnelled" : "refused",
               "Workload connections redirected to the agent, by result.").increment()
    }

    /// Access-log lines dropped because the disk fell behind.
    public func recordAccessLogDropped(_ n: Int) {
        lock.withLock {
            accessLogDropped = accessLogDropped ?? registry.counter("palisade_access_log_dropped_total",
                help: "Access-log lines dropped because writing them fell too far behind.")
            return accessLogDropped!
        }.increment(by: Int64(n))
    }
    private var accessLogDropped: Counter?

    // MARK: DNS proxy (toFQDNs)

    lazy var dnsLatency = registry.valueHistogram("palisade_dns_proxy_duration_seconds",
        buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5],
        help: "Time from a workload's DNS query reaching the proxy to its answer leaving it (resolver and kernel writes included).")
    lazy var learnedAddresses = registry.gauge("palisade_fqdn_learned_addresses", help: "Addresses DNS answers taught for toFQDNs selectors, in force now.")

    /// One query through the DNS proxy, by result (answered, refused, failed, unknown-source, malformed).
    public func recordDNS(result r: String, seconds: Double) {
        result("palisade_dns_requests_total", r, "DNS queries of enrolled workloads through the agent's proxy, by result.").increment()
        lock.lock(); let h = dnsLatency; lock.unlock()
        if r == "answered" || r == "refused" { h.record(seconds) }
    }

    /// Learned addresses in force, and those refused (a toFQDNs selector full).
    public func setLearnedAddresses(_ n: Int) {
        lock.lock(); let g = learnedAddresses; lock.unlock()
        g.set(to: Double(n))
    }

    public func recordLearnedRefused(_ n: Int) {
        result("palisade_fqdn_refused_addresses_total", "selector-full",
               "Addresses from DNS answers not learned (never allowed), by reason.").increment(by: Int64(n))
    }

    public func recordTunnelStream(delivered: Bool) {
        result("palisade_tunnel_inbound_streams_total", delivered ? "delivered" : "refused",
               "Tunnel streams received from peer agents, by result.").increment()
    }

    public func recordHandshake(accepted: Bool) {
        lock.lock(); let c = accepted ? handshakesAccepted : handshakesRefused; lock.unlock()
        c.increment()
    }

    /// Expiry of the SVID currently issued for an identity (Unix seconds).
    public func setCertificateExpiry(spiffeID: String, notAfter: Date?) {
        lock.lock(); defer { lock.unlock() }
        if let notAfter {
            let gauge = certificateExpiry[spiffeID] ?? registry.gauge("palisade_certificate_expiry_timestamp_seconds", labels: [("spiffe_id", spiffeID)],
                                                                       help: "When the X.509-SVID issued for an identity expires (it is re-issued at half-life).")
            certificateExpiry[spiffeID] = gauge
            gauge.set(to: notAfter.timeIntervalSince1970)
        } else if let g = certificateExpiry.removeValue(forKey: spiffeID) {
            registry.unregisterGauge(g)
        }
    }

    public func setPolicyValid(_ valid: Bool) { policyValid.set(to: valid ? 1 : 0) }
    lazy var policyInstalled = registry.gauge("palisade_policy_installed",
                                                  help: "1 if the declared policy is what the kernel enforces; 0 while an apply is refused (e.g. it does not fit) and the previous policy stays.")
    lazy var lockedDown = registry.gauge("palisade_policy_locked_down_workloads",
                                             help: "Workloads of this node held at default deny because the policy that selects them could not be installed.")
    public func setPolicyInstalled(_ installed: Bool, lockedDown n: Int) {
        lock.lock(); let g = policyInstalled, l = lockedDown; lock.unlock()
        g.set(to: installed ? 1 : 0)
        l.set(to: Double(n))
    }
    lazy var storeConnected = registry.gauge("palisade_store_connected",
                                                 help: "1 if the shared store (etcd) is reachable; 0 while enforcing the last known state.")
    public func setStoreConnected(_ up: Bool) {
        lock.lock(); let g = storeConnected; lock.unlock()
        g.set(to: up ? 1 : 0)
    }
    public func setWorkloads(_ n: Int) { workloads.set(to: Double(n)) }

    public func recordEvent(verdict: String, direction: String, local: String, peer: String) {
        eventsTotal[verdict]?.increment()
        if verdict == Outcome.denied.rawValue { pair("palisade_identity_pair_denied_flows_total", "Denied new flows by identity pair (from kernel events).",
                                      direction, local, peer).increment() }
    }

    private struct HTTPSeriesKey: Hashable {
        var source, destination: String
        var statusClass: Int
        var decision: String
    }
    private struct HTTPPairKey: Hashable { var source, destination: String }
    private var httpCounters: [HTTPSeriesKey: Counter] = [:]
    private var httpLatency: [HTTPPairKey: ValueHistogram] = [:]

    /// Golden signals of the L7 proxy per (source, destination) identity
    /// pair: requests by status class and decision, and latency. Bounded
    /// like the other pair series (beyond the limit: "other").
    /// Recorded through a connection's `HTTPConnectionMetrics`; this is
    /// the request counter and latency histogram of one series.
    func httpSeries(source: String, destination: String, statusClass: Int, decision: String) -> (Counter, ValueHistogram) {
        lock.withLock {
            var key = HTTPSeriesKey(source: source, destination: destination, statusClass: statusClass, decision: decision)
            if let c = httpCounters[key], let h = httpLatency[HTTPPairKey(source: source, destination: destination)] { return (c, h) }
            if httpCounters.count + httpLatency.count >= maxPairs { (key.source, key.destination) = ("other", "other") }
            let pair = HTTPPairKey(source: key.source, destination: key.destination)
            let c = httpCounters[key] ?? registry.counter("palisade_http_requests_total",
                labels: [("source", key.source), ("destination", key.destination), ("code", "\(key.statusClass)xx"), ("decision", decision)],
                help: "Requests through the L7 proxy by identity pair, status class and decision.")
            httpCounters[key] = c
            let h = httpLatency[pair] ?? registry.valueHistogram("palisade_http_request_duration_seconds",
                labels: [("source", key.source), ("destination", key.destination)], buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
                help: "Request duration through the L7 proxy by identity pair.")
            httpLatency[pair] = h
            return (c, h)
        }
    }

    /// The request metrics of one proxied connection, whose source and
    /// destination are fixed: the series it used are kept, so a request
    /// costs no lock and no hashing of two SPIFFE IDs in the shared tables.
    public func httpConnection(source: String, destination: String) -> HTTPConnectionMetrics {
        HTTPConnectionMetrics(metrics: self, source: source, destination: destination)
    }

    func pair(_ name: String, _ help: String, _ direction: String, _ local: String, _ peer: String) -> Counter {
        lock.lock(); defer { lock.unlock() }
        var key = "\(name)|\(direction)|\(local)|\(peer)"
        var labels = [("direction", direction), ("local", local), ("peer", peer)]
        if pairCounters[key] == nil && pairCounters.count >= maxPairs {
            key = "\(name)|\(direction)|other|other"
            labels = [("direction", direction), ("local", "other"), ("peer", "other")]
        }
        if let c = pairCounters[key] { return c }
        let c = registry.counter(name, labels: labels, help: help)
        pairCounters[key] = c
        return c
    }

    // MARK: scrape

    static func advance(_ entry: inout (Counter, UInt64), to value: UInt64) {
        if value > entry.1 { entry.0.increment(by: Int64(value - entry.1)) }
        entry.1 = value
    }

    /// Reads the kernel state into the registry and renders the exposition.
    /// names: identities; peerNames: the peer of a policy entry (a class).
    public func render(names: IdentityNamer, peerNames: IdentityNamer, capacities: [String: Int]) -> [UInt8] {
        refreshKernelCounters()
        refreshRuleHits(names: names, peerNames: peerNames)
        refreshMapPressure(capacities: capacities)
        return registry.emitToBuffer()
    }

    func refreshKernelCounters() {
        guard let totals = try? maps.counterTotals() else { return }
        lock.lock(); defer { lock.unlock() }
        for d in Direction.allCases {
            for r in Reason.allCases {
                let c = totals[Int(d.kernel)][Int(r.rawValue)]
                let key = "\(d.rawValue)|\(r)"
                let verdict = r.outcome.rawValue
                let labels = [("direction", d.rawValue), ("reason", r.description), ("verdict", verdict)]
                var packets = packetCounters[key] ?? (registry.counter("palisade_datapath_packets_total", labels: labels,
                                                                       help: "Packets judged by the datapath, by direction, verdict and reason."), 0)
                var bytes = byteCounters[key] ?? (registry.counter("palisade_datapath_bytes_total", labels: labels,
                                                                   help: "Bytes judged by the datapath, by direction, verdict and reason."), 0)
                AgentMetrics.advance(&packets, to: c.packets)
                AgentMetrics.advance(&bytes, to: c.bytes)
                packetCounters[key] = packets
                byteCounters[key] = bytes
            }
        }
        if let ev = try? maps.eventTotals() {
            AgentMetrics.advance(&suppressed, to: ev.suppressed)
            AgentMetrics.advance(&lost, to: ev.lost)
        }
    }

    /// New flows per identity pair and verdict, from the hit counters every
    /// policy entry carries (only entries of the generation in force).
    func refreshRuleHits(names: IdentityNamer, peerNames: IdentityNamer) {
        guard let entries = try? maps.policy.entries() else { return }
        let config = maps.activeConfig   // one read, not one per entry
        let slot = UInt8(config.active_slot & 1)
        var deltas: [(String, String, String, String, UInt64)] = []
        lock.lock()
        var seen: [String: UInt64] = [:]
        for (k, v) in entries where k.generation == slot && v.packets > 0 {
            let id = withUnsafeBytes(of: k) { Data($0).base64EncodedString() } + "|\(config.generation)"
            let before = ruleHits[id] ?? 0
            seen[id] = v.packets
            guard v.packets > before else { continue }
            let verdict = Verdict(rawValue: v.verdict).map { $0 == .audit ? "audit" : $0.description } ?? "unknown"
            deltas.append((Direction(kernel: k.direction).rawValue, names(UInt32(bigEndian: k.local_identity)),
                           peerNames(UInt32(bigEndian: k.peer_class)), verdict, v.packets - before))
        }
        ruleHits = seen
        lock.unlock()
        for (dir, local, peer, verdict, n) in deltas {
            pairVerdict(dir, local, peer, verdict).increment(by: Int64(n))
        }
    }

    func pairVerdict(_ direction: String, _ local: String, _ peer: String, _ verdict: String) -> Counter {
        lock.lock(); defer { lock.unlock() }
        let name = "palisade_rule_matches_total"
        var key = "\(name)|\(direction)|\(local)|\(peer)|\(verdict)"
        var labels = [("direction", direction), ("local", local), ("peer", peer), ("verdict", verdict)]
        if pairCounters[key] == nil && pairCounters.count >= maxPairs {
            key = "\(name)|\(direction)|other|other|\(verdict)"
            labels = [("direction", direction), ("local", "other"), ("peer", "other"), ("verdict", verdict)]
        }
        if let c = pairCounters[key] { return c }
        let c = registry.counter(name, labels: labels,
                                     help: "New flows that matched a policy rule, by local identity, peer (the rule selectors the peer matched, a reserved or CIDR identity; \"any\" for wildcard rules) and verdict.")
        pairCounters[key] = c
        return c
    }

    func refreshMapPressure(capacities: [String: Int]) {
        let counts: [(String, Int?)] = [
            ("conntrack", try? maps.conntrack.entries().count),
            ("policy", try? maps.policy.keys().count),
            ("ipcache", try? maps.ipcache.keys().count),
            ("defaults", try? maps.defaults.keys().count),
            ("peer_class", try? maps.peerClasses.keys().count),
            ("endpoints_by_ifindex", try? maps.endpointsByIfindex.keys().count),
            ("endpoints_by_cgroup", try? maps.endpointsByCgroup.keys().count),
        ]
        lock.lock(); defer { lock.unlock() }
        for (name, count) in counts {
            guard let count else { continue }
            let entries = mapEntries[name] ?? registry.gauge("palisade_map_entries", labels: [("map", name)], help: "Entries in a datapath map (both generations during an apply).")
            let capacity = mapCapacity[name] ?? registry.gauge("palisade_map_capacity_entries", labels: [("map", name)], help: "Capacity of a datapath map.")
            mapEntries[name] = entries
            mapCapacity[name] = capacity
            entries.set(to: Double(count))
            capacity.set(to: Double(capacities[name] ?? 0))
        }
    }
}

/// Metrics named in full through swift-prometheus' descriptor API (the
/// names are the exposition's, so the descriptor has no separate parts).
extension PrometheusCollectorRegistry {
    static func descriptor(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }
    func counter(_ name: String, labels: [(String, String)] = [], help: String) -> Counter {
        makeCounter(descriptor: Self.descriptor(name, help), labels: labels)
    }
    func gauge(_ name: String, labels: [(String, String)] = [], help: String) -> Gauge {
        makeGauge(descriptor: Self.descriptor(name, help), labels: labels)
    }
    func valueHistogram(_ name: String, labels: [(String, String)] = [], buckets: [Double], help: String) -> ValueHistogram {
        makeValueHistogram(descriptor: Self.descriptor(name, help), labels: labels, buckets: buckets)
    }
    func durationHistogram(_ name: String, labels: [(String, String)] = [], buckets: [Duration], help: String) -> DurationHistogram {
        makeDurationHistogram(descriptor: Self.descriptor(name, help), labels: labels, buckets: buckets)
    }
}

/// One proxied connection's request series (see `httpConnection`). Not
/// thread-safe: a connection records on its own event loop only.
public final class HTTPConnectionMetrics: @unchecked Sendable {
    let metrics: AgentMetrics
    let source: String, destination: String
    private var histogram: ValueHistogram?
    /// By status class and decision: a connection meets few of them.
    private var counters: [(statusClass: Int, decision: String, counter: Counter)] = []

    init(metrics: AgentMetrics, source: String, destination: String) {
        self.metrics = metrics; self.source = source; self.destination = destination
    }

    public func record(status: Int, decision: String, seconds: Double) {
        let statusClass = status / 100
        if let histogram, let i = counters.firstIndex(where: { $0.statusClass == statusClass && $0.decision == decision }) {
            counters[i].counter.increment()
            histogram.record(seconds)
            return
        }
        let (c, h) = metrics.httpSeries(source: source, destination: destination, statusClass: statusClass, decision: decision)
        histogram = h
        counters.append((statusClass, decision, c))
        c.increment()
        h.record(seconds)
    }
}
