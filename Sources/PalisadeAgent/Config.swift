import Foundation
import NIOCore
import PalisadeBPF
import PalisadeDNS
import PalisadeJWT
import PalisadePolicy
import PalisadeStore

/// Agent configuration. Every field has a default, so the agent runs with
/// no file at all (the embedded default: state on local disk, no server).
public struct AgentConfig: Sendable {
    public var trustDomain = "palisade.local"
    public var stateDir = "/var/lib/palisade"
    public var bpffs = "/sys/fs/bpf/palisade"
    public var policyDir: String?
    public var workloadDir: String?
    /// cgroup v2 mount; found from /proc/mounts when not given.
    public var cgroupRoot: String?
    /// Deny events per CPU per second sent to the agent (token bucket in the kernel).
    public var eventsPerSecond: UInt32 = 100
    /// Also report allowed new flows (not only denied and audited ones).
    public var allowedFlowEvents = false
    public var pollIntervalMilliseconds = 1000
    /// Node addresses mapped to reserved:host; discovered when not given.
    public var hostAddresses: [IPAddress]?
    /// Prometheus endpoint, "HOST:PORT" (loopback by default) or nil for off.
    public var metricsAddress: (host: String, port: Int)? = ("127.0.0.1", 9654)
    /// Most identity-pair series before further pairs are folded into "other".
    public var metricsIdentityPairs = 200
    /// Trust bundles (PEM files, one or more roots each) of federated trust
    /// domains, by trust domain name. The node's own domain uses its CA.
    public var federatedBundles: [String: String] = [:]
    /// Token issuers whose JWTs map to identities at the edge (for L7 rules).
    public var jwtIssuers: [JWTIssuer] = []
    /// The mTLS listener (TLS 1.3, SPIFFE-verified client certificates), or nil.
    public var tunnelAddress: (host: String, port: Int)? = ("0.0.0.0", 15008)
    /// Lifetime of issued X.509-SVIDs; they are re-issued at half of it.
    public var svidLifetimeSeconds = 3600
    /// Workloads enrolled by the configuration itself (besides workloadDir).
    public var workloads: [Workload] = []
    /// The outbound listener port that enrolled workloads' connections to
    /// remote workloads are redirected to (nil: no redirection).
    public var outboundPort: Int? = 15001
    /// Other nodes' agents, by name, when no store shares them (the store's are added).
    public var nodes: [MeshNode] = []
    /// Workloads running on other nodes, reached through their node's agent.
    public var remoteWorkloads: [RemoteWorkload] = []
    /// The shared store (etcd v3) where nodes publish themselves and their
    /// workloads and learn everyone else's; nil: this node alone, with the
    /// static `nodes`/`remoteWorkloads`.
    public var store: StoreConfig?
    /// The trust domain's issuer (`palisade ca serve`); nil: this node runs
    /// its own CA in-process (one machine, or nodes sharing STATE/ca).
    public var issuer: IssuerConfig?
    /// The tunnel address other nodes use (published in the store).
    public var advertiseAddress: String?
    /// Where this node runs: global services prefer endpoints in the same
    /// zone, then region, then cloud.
    public var locality = Locality()
    /// Global services: a virtual IP and port whose endpoints are the
    /// workloads (on any node, in any cloud) matching the selector.
    public var services: [GlobalService] = []
    /// Fraction of L7 requests written to STATE/access.jsonl (0...1).
    public var accessLogSampling = 1.0
    /// A connection to the mTLS listener that has not completed its TLS
    /// handshake by then is closed; at most this many may be handshaking at
    /// once, overall and from one address (refusals counted by reason).
    public var handshakeTimeoutMilliseconds = 10_000
    public var maxPendingHandshakes = 1024
    public var maxPendingHandshakesPerSource = 64
    /// HTTP proxy: a request head must be complete this long after its first
    /// byte (408 past it), a request body may stall this long.
    public var httpRequestHeadTimeoutMilliseconds = 10_000
    public var httpBodyIdleTimeoutMilliseconds = 30_000
    /// The tunnel's receiving side closes a peer's connection with no
    /// stream open this long, and a stream with no bytes either way.
    public var tunnelConnectionIdleSeconds = 600
    public var tunnelStreamIdleSeconds = 3600
    /// The DNS proxy for toFQDNs rules (UDP and TCP), reached where the
    /// outbound listener is; nil: enrolled workloads' DNS goes direct and
    /// toFQDNs rules learn nothing.
    public var dnsProxyPort: Int? = 15053
    /// Learned addresses: TTLs raised to the floor and cut to the cap, kept
    /// `graceSeconds` past expiry, at most this many per toFQDNs selector.
    public var fqdn = FQDNCache.Limits()
    /// Event-loop threads of the data path: the outbound listener, the mTLS
    /// listener and the DNS proxy share them, and a relayed connection stays
    /// on the loop that accepted it. Default: one per core.
    public var eventLoops = System.coreCount
    /// Ten seconds after start-up, after each reconcile and at each
    /// memory release, code and read-only pages are unmapped (CodePages):
    /// RSS then shows the data path's working set, not what start-up or an
    /// earlier burst touched.
    public var releaseCodePages = true
    /// Every this many seconds the heap's free pages go back to the kernel
    /// (FreeHeap), and code pages too (releaseCodePages): memory a burst
    /// needed is returned once it ends. 0: never.
    public var memoryReleaseSeconds = 30

    public init() {}

    public var resolvedPolicyDir: String { policyDir ?? "\(stateDir)/policies" }
    public var resolvedWorkloadDir: String { workloadDir ?? "\(stateDir)/workloads" }
    public var resolvedCgroupRoot: String? { cgroupRoot ?? BPFFS.cgroup2Mount() }
    public var stateFile: String { "\(stateDir)/state.json" }
    public var eventLog: String { "\(stateDir)/events.jsonl" }
    /// The L7 proxy's access log (rotated to .1 at 64 MiB).
    public var accessLogPath: String { "\(stateDir)/access.jsonl" }
    public var flowSocket: String { "\(stateDir)/flows.sock" }
    /// Names DNS answered and their addresses, kept across restarts.
    public var fqdnFile: String { "\(stateDir)/fqdn.json" }
    public var caDir: String { "\(stateDir)/ca" }
    public var svidDir: String { "\(stateDir)/svids" }

    /// This node's name (its SPIFFE ID's last segment); the host name when not set.
    public var nodeName: String?

    /// This node's own SPIFFE ID: spiffe://TD/palisade/node/NAME.
    public var nodeSpiffeID: SpiffeID {
        var buf = [UInt8](repeating: 0, count: 256)
        gethostname(&buf, buf.count)
        let host = (nodeName ?? String(decoding: buf.prefix { $0 != 0 }, as: UTF8.self)).map { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == ".") ? $0 : "-" }
        // (The trust domain was checked when the configuration was read.)
        guard let id = try? SpiffeID("spiffe://\(trustDomain)/palisade/node/\(String(host).isEmpty ? "node" : String(host))") else {
            preconditionFailure("trust domain '\(trustDomain)' passed the configuration check but makes no SPIFFE ID")
        }
        return id
    }

    static let keys: Set<String> = ["trustDomain", "stateDir", "bpffs", "policyDir", "workloadDir", "cgroupRoot",
                                    "eventsPerSecond", "pollIntervalMilliseconds", "hostAddresses", "workloads", "metricsAddress", "metricsIdentityPairs", "allowedFlowEvents", "svidLifetimeSeconds", "federatedBundles", "tunnelAddress", "jwtIssuers",
                                    "outboundPort", "nodes", "remoteWorkloads", "nodeName", "store", "issuer", "advertiseAddress",
                                    "locality", "services", "accessLogSampling",
                                    "handshakeTimeoutMilliseconds", "maxPendingHandshakes", "maxPendingHandshakesPerSource",
                                    "httpRequestHeadTimeoutMilliseconds", "httpBodyIdleTimeoutMilliseconds",
                                    "tunnelConnectionIdleSeconds", "tunnelStreamIdleSeconds", "dnsProxyPort", "fqdn", "eventLoops", "releaseCodePages", "memoryReleaseSeconds"]

    /// "HOST:PORT" with an IP address (IPv6 in brackets), or "off" (nil).
    static func address(_ v: YAMLValue) throws -> (host: String, port: Int)? {
        let text = try v.string()
        if text == "off" { return nil }
        guard let address = HostPort(text, ports: 0...65535), IPAddress(address.host) != nil else {
            throw v.error("expected HOST:PORT with an IP address (for example 127.0.0.1:9654, [::1]:9654) or 'off', got '\(text)'")
        }
        return (address.host, address.port)
    }

    /// Loads a YAML file; unknown fields and bad values are precise errors.
    public static func load(path: String?) throws -> AgentConfig {
        guard let path else { return AgentConfig() }
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw InputError(SourceLocation(file: path, line: 0), field: "", "cannot read configuration: \(error.localizedDescription)")
        }
        return try parse(text, file: path)
    }

    /// A configuration's text (`path` names it in errors).
    public static func parse(_ text: String, file path: String) throws -> AgentConfig {
        var c = AgentConfig()
        guard let doc = try YAMLValue.documents(text, file: path).first, !doc.isNull else { return c }
        let m = try doc.mapping(allowedKeys: keys)
        if let v = m["trustDomain"] {
            let td = try v.string()
            guard (try? SpiffeIDCheck.trustDomain(td)) != nil else { throw v.error("expected a trust domain (lowercase letters, digits, '.', '-', '_'), got '\(td)'") }
            c.trustDomain = td
        }
        for (key, setter) in [("stateDir", { (s: String) in c.stateDir = s }), ("bpffs", { c.bpffs = $0 }),
                              ("policyDir", { c.policyDir = $0 }), ("workloadDir", { c.workloadDir = $0 }),
                              ("cgroupRoot", { c.cgroupRoot = $0 })] {
            if let v = m[key] {
                let s = try v.string()
                guard s.hasPrefix("/") else { throw v.error("expected an absolute path, got '\(s)'") }
                setter(s)
            }
        }
        if let v = m["eventsPerSecond"] { c.eventsPerSecond = UInt32(try v.int(in: 0...1_000_000)) }
        if let v = m["pollIntervalMilliseconds"] { c.pollIntervalMilliseconds = try v.int(in: 50...60_000) }
        if let v = m["handshakeTimeoutMilliseconds"] { c.handshakeTimeoutMilliseconds = try v.int(in: 100...300_000) }
        if let v = m["maxPendingHandshakes"] { c.maxPendingHandshakes = try v.int(in: 1...1_000_000) }
        if let v = m["maxPendingHandshakesPerSource"] { c.maxPendingHandshakesPerSource = try v.int(in: 1...1_000_000) }
        if let v = m["httpRequestHeadTimeoutMilliseconds"] { c.httpRequestHeadTimeoutMilliseconds = try v.int(in: 100...600_000) }
        if let v = m["httpBodyIdleTimeoutMilliseconds"] { c.httpBodyIdleTimeoutMilliseconds = try v.int(in: 100...3_600_000) }
        if let v = m["tunnelConnectionIdleSeconds"] { c.tunnelConnectionIdleSeconds = try v.int(in: 1...86_400) }
        if let v = m["tunnelStreamIdleSeconds"] { c.tunnelStreamIdleSeconds = try v.int(in: 1...604_800) }
        if let v = m["eventLoops"] { c.eventLoops = try v.int(in: 1...256) }
        if let v = m["releaseCodePages"] { c.releaseCodePages = try v.bool() }
        if let v = m["memoryReleaseSeconds"] { c.memoryReleaseSeconds = try v.int(in: 0...86_400) }
        if let v = m["dnsProxyPort"] {
            if (try? v.string()) == "off" { c.dnsProxyPort = nil } else { c.dnsProxyPort = try v.int(in: 1...65535) }
        }
        if let v = m["fqdn"] {
            let f = try v.mapping(allowedKeys: ["minTTL", "maxTTL", "graceSeconds", "maxAddressesPerSelector"])
            if let x = f["minTTL"] { c.fqdn.minTTL = UInt32(try x.int(in: 0...86_400)) }
            if let x = f["maxTTL"] { c.fqdn.maxTTL = UInt32(try x.int(in: 1...604_800)) }
            if let x = f["graceSeconds"] { c.fqdn.graceSeconds = UInt32(try x.int(in: 0...86_400)) }
            if let x = f["maxAddressesPerSelector"] { c.fqdn.maxAddressesPerSelector = try x.int(in: 1...65_536) }
            if c.fqdn.minTTL > c.fqdn.maxTTL { throw (f["minTTL"] ?? v).error("minTTL \(c.fqdn.minTTL) is above maxTTL \(c.fqdn.maxTTL)") }
        }
        if let v = m["metricsAddress"] { c.metricsAddress = try address(v) }
        if let v = m["tunnelAddress"] { c.tunnelAddress = try address(v) }
        if let v = m["federatedBundles"] {
            for (td, path) in try v.mapping() {
                guard (try? SpiffeIDCheck.trustDomain(td)) != nil else { throw path.error("'\(td)' is not a trust domain name") }
                let p = try path.string()
                guard p.hasPrefix("/") else { throw path.error("expected an absolute path to a PEM bundle, got '\(p)'") }
                c.federatedBundles[td] = p
            }
        }
        if let v = m["jwtIssuers"] {
            c.jwtIssuers = try v.sequence().map { e in
                let f = try e.mapping(allowedKeys: ["issuer", "jwks", "audience"])
                guard let i = f["issuer"], let j = f["jwks"], let a = f["audience"] else { throw e.error("a JWT issuer needs 'issuer', 'jwks' (a JWKS file) and 'audience'") }
                let path = try j.string()
                guard path.hasPrefix("/") else { throw j.error("expected an absolute path to a JWKS file, got '\(path)'") }
                guard let data = FileManager.default.contents(atPath: path),
                      let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any], obj["keys"] is [Any] else {
                    throw j.error("\(path) is not a readable JWKS (a JSON object with a 'keys' list)")
                }
                return JWTIssuer(issuer: try i.string(), jwksFile: path, audience: try a.string())
            }
        }
        if let v = m["svidLifetimeSeconds"] { c.svidLifetimeSeconds = try v.int(in: 10...(30 * 86400)) }
        if let v = m["allowedFlowEvents"] { c.allowedFlowEvents = try v.bool() }
        if let v = m["metricsIdentityPairs"] { c.metricsIdentityPairs = try v.int(in: 1...100_000) }
        if let v = m["workloads"] {
            c.workloads = try v.sequence().map { try Workload.parse($0, trustDomain: c.trustDomain) }
        }
        if let v = m["nodeName"] {
            let n = try v.string()
            guard !n.isEmpty, n.count <= 63, n.allSatisfy({ $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "-" || $0 == ".") }) else {
                throw v.error("expected a node name of lowercase letters, digits, '-' and '.', got '\(n)'")
            }
            c.nodeName = n
        }
        if let v = m["outboundPort"] {
            if (try? v.string()) == "off" { c.outboundPort = nil } else { c.outboundPort = try v.int(in: 1...65535) }
        }
        if let v = m["nodes"] {
            c.nodes = try v.sequence().map { try MeshNode.parse($0, defaultTrustDomain: c.trustDomain) }
            var seen = Set<String>()
            for (n, e) in zip(c.nodes, try v.sequence()) where !seen.insert(n.name).inserted {
                throw e.error("node '\(n.name)' is listed twice")
            }
        }
        if let v = m["remoteWorkloads"] {
            let names = Set(c.nodes.map(\.name))
            c.remoteWorkloads = try v.sequence().map { e in
                let r = try RemoteWorkload.parse(e)
                guard names.contains(r.node) else { throw e.error("node '\(r.node)' is not in 'nodes' (known: \(names.sorted().joined(separator: ", ")))") }
                return r
            }
        }
        if let v = m["store"] { c.store = try StoreConfig.parse(v) }
        if let v = m["issuer"] { c.issuer = try IssuerConfig.parse(v) }
        if let v = m["locality"] { c.locality = try Locality.parse(v) }
        if let v = m["accessLogSampling"] {
            guard let d = Double(try v.string()), (0...1).contains(d) else { throw v.error("expected a fraction between 0 and 1") }
            c.accessLogSampling = d
        }
        if let v = m["services"] {
            c.services = try v.sequence().map(GlobalService.parse)
            var seen = Set<IPAddress>()
            for (svc, e) in zip(c.services, try v.sequence()) where !seen.insert(svc.vip).inserted {
                throw e.error("virtual IP \(svc.vip) is used by two services")
            }
        }
        if let v = m["advertiseAddress"] {
            guard let a = try address(v) else { throw v.error("advertiseAddress cannot be 'off'") }
            c.advertiseAddress = HostPort(host: a.host, port: a.port).description
        }
        // (No tunnel, nothing to advertise: an operator's configuration for
        // store commands says `tunnelAddress: off`.)
        if c.store != nil && c.advertiseAddress == nil, let t = c.tunnelAddress {
            guard t.host != "0.0.0.0", t.host != "::" else {
                throw doc.error("with a 'store', set 'advertiseAddress' (the IP:PORT other nodes reach this node's tunnel at)")
            }
            c.advertiseAddress = HostPort(host: t.host, port: t.port).description
        }
        if let v = m["hostAddresses"] {
            c.hostAddresses = try v.sequence().map { a -> IPAddress in
                guard let ip = IPAddress(try a.string()) else { throw a.error("expected an IP address, got \(a.kindName)") }
                return ip
            }
        }
        return c
    }
}

import PalisadeIdentity
enum SpiffeIDCheck {
    static func trustDomain(_ td: String) throws -> SpiffeID { try SpiffeID("spiffe://\(td)") }
}

public struct Locality: Sendable, Hashable, Codable {
    public var cloud: String?
    public var region: String?
    public var zone: String?
    public init(cloud: String? = nil, region: String? = nil, zone: String? = nil) { self.cloud = cloud; self.region = region; self.zone = zone }
    static func parse(_ v: YAMLValue) throws -> Locality {
        let m = try v.mapping(allowedKeys: ["cloud", "region", "zone"])
        return Locality(cloud: try m["cloud"]?.string(), region: try m["region"]?.string(), zone: try m["zone"]?.string())
    }
}

/// `{name, vip, port, selector: {labels}}`.
public struct GlobalService: Sendable, Hashable, Codable {
    public var name: String
    public var vip: IPAddress
    public var port: Int
    public var selector: [String: String]
    public init(name: String, vip: IPAddress, port: Int, selector: [String: String]) { self.name = name; self.vip = vip; self.port = port; self.selector = selector }
    static func parse(_ v: YAMLValue) throws -> GlobalService {
        let m = try v.mapping(allowedKeys: ["name", "vip", "port", "selector"])
        guard let n = m["name"], let ip = m["vip"], let p = m["port"], let sel = m["selector"] else {
            throw v.error("a service needs 'name', 'vip', 'port' and 'selector' (labels of its endpoints)")
        }
        guard let vip = IPAddress(try ip.string()) else { throw ip.error("expected an IP address for the virtual IP") }
        let labels = try PolicyParser.labels(sel)
        guard !labels.isEmpty else { throw sel.error("an empty selector would pick every workload") }
        return GlobalService(name: try n.string(), vip: vip, port: try p.int(in: 1...65535), selector: labels)
    }
}

/// Another node's agent: where its tunnel listens and who it must be.
public struct MeshNode: Sendable, Hashable {
    public var locality = Locality()
    public var name: String
    public var tunnelHost: String
    public var tunnelPort: Int
    public var trustDomain: String
    /// Its node SPIFFE ID, if pinned; else any spiffe://TD/palisade/node/... of its trust domain.
    public var spiffeID: SpiffeID?

    static func parse(_ v: YAMLValue, defaultTrustDomain: String) throws -> MeshNode {
        let m = try v.mapping(allowedKeys: ["name", "tunnelAddress", "trustDomain", "spiffeID", "locality"])
        guard let n = m["name"], let a = m["tunnelAddress"] else { throw v.error("a node needs 'name' and 'tunnelAddress' (IP:PORT of its agent's mTLS listener)") }
        guard let (host, port) = try AgentConfig.address(a) else { throw a.error("a node's tunnelAddress cannot be 'off'") }
        var node = MeshNode(name: try n.string(), tunnelHost: host, tunnelPort: port, trustDomain: defaultTrustDomain, spiffeID: nil)
        if let l = m["locality"] { node.locality = try Locality.parse(l) }
        if let t = m["trustDomain"] {
            let td = try t.string()
            guard (try? SpiffeIDCheck.trustDomain(td)) != nil else { throw t.error("'\(td)' is not a trust domain name") }
            node.trustDomain = td
        }
        if let s = m["spiffeID"] {
            let id = try PolicyParser.spiffe(s)
            guard id.trustDomain == node.trustDomain, id.path.hasPrefix("/palisade/node/") else {
                throw s.error("expected a node identity spiffe://\(node.trustDomain)/palisade/node/NAME, got \(id)")
            }
            node.spiffeID = id
        }
        return node
    }
}

/// A workload on another node: its identity, labels and addresses (for
/// policy and the ipcache) and the node whose agent delivers to it.
public struct RemoteWorkload: Sendable, Hashable {
    public var name: String
    public var spiffeID: SpiffeID
    public var namespace: String
    public var labels: [String: String]
    public var namespaceLabels: [String: String]
    public var addresses: [IPAddress]
    public var node: String
    public var ports: [NamedPort] = []

    static func parse(_ v: YAMLValue) throws -> RemoteWorkload {
        let m = try v.mapping(allowedKeys: ["name", "spiffeID", "namespace", "labels", "namespaceLabels", "addresses", "node", "ports"])
        guard let n = m["name"], let s = m["spiffeID"], let a = m["addresses"], let node = m["node"] else {
            throw v.error("a remote workload needs 'name', 'spiffeID', 'addresses' and 'node'")
        }
        let addresses = try a.sequence().map { e -> IPAddress in
            guard let ip = IPAddress(try e.string()) else { throw e.error("expected an IP address, got \(e.kindName)") }
            return ip
        }
        guard !addresses.isEmpty else { throw a.error("expected at least one address") }
        var r = RemoteWorkload(name: try n.string(), spiffeID: try PolicyParser.spiffe(s),
                               namespace: try m["namespace"].map { try $0.string() } ?? "default",
                               labels: try m["labels"].map { try PolicyParser.labels($0) } ?? [:],
                               namespaceLabels: try m["namespaceLabels"].map { try PolicyParser.labels($0) } ?? [:],
                               addresses: addresses, node: try node.string())
        r.ports = try m["ports"].map { try PolicyParser.namedPorts($0) } ?? []
        return r
    }
}

/// `store: {etcd: [URL...], ca: FILE, cert: FILE, key: FILE, prefix: /palisade/}`.
/// Where a node gets its SVIDs when no signing key is on it:
///
///     issuer:
///       address: 10.0.0.1:15100          # palisade ca serve --listen
///       bundle: /etc/palisade/bundle.pem  # the trust domain's root(s): palisade ca bundle, on the issuer
///       joinTokenFile: /etc/palisade/join-token   # palisade ca join-token --node NAME (used once)
public struct IssuerConfig: Sendable {
    /// One issuer, or several (each with its own intermediate of the trust
    /// domain's root, `root.pem` beside it): tried in turn when one is down.
    public var addresses: [HostPort]
    public var bundleFile: String
    public var joinTokenFile: String?

    static func parse(_ v: YAMLValue) throws -> IssuerConfig {
        let m = try v.mapping(allowedKeys: ["address", "addresses", "bundle", "joinTokenFile"])
        var addresses: [HostPort] = []
        for a in (m["address"].map { [$0] } ?? []) + (try m["addresses"]?.sequence() ?? []) {
            guard let (host, port) = try AgentConfig.address(a) else { throw a.error("an issuer address cannot be 'off'") }
            addresses.append(HostPort(host: host, port: port))
        }
        guard !addresses.isEmpty else { throw v.error("an issuer needs 'address' (HOST:PORT of palisade ca serve) or 'addresses' (several)") }
        guard let b = m["bundle"] else { throw v.error("an issuer needs 'bundle' (a PEM file with the trust domain's root, from palisade ca bundle)") }
        let bundle = try b.string()
        guard bundle.hasPrefix("/"), FileManager.default.isReadableFile(atPath: bundle) else { throw b.error("expected a readable absolute path, got '\(bundle)'") }
        var token: String?
        if let t = m["joinTokenFile"] {
            let path = try t.string()
            guard path.hasPrefix("/") else { throw t.error("expected an absolute path, got '\(path)'") }
            token = path
        }
        return IssuerConfig(addresses: addresses, bundleFile: bundle, joinTokenFile: token)
    }
}

public struct StoreConfig: Sendable {
    public var endpoints: [String]
    public var caFile: String?
    public var certificateFile: String?
    public var keyFile: String?
    public var prefix = "/palisade/"
    /// etcd authentication: the user (`palisade-node-NAME` for a node, see
    /// `palisade store grant-node`) and a file holding its password (0600).
    public var user: String?
    public var passwordFile: String?

    /// The etcd client this configuration describes.
    public func makeStore() throws -> EtcdStore {
        let tls = caFile.map { EtcdStore.TLS(caFile: $0, certificateFile: certificateFile, keyFile: keyFile) }
        var credentials: EtcdStore.Credentials?
        if let user, let passwordFile {
            let mode = (try FileManager.default.attributesOfItem(atPath: passwordFile)[.posixPermissions] as? NSNumber)?.intValue ?? 0
            guard mode & 0o077 == 0 else { throw StoreError.permissionDenied("\(passwordFile) is readable by group or others (mode \(String(mode, radix: 8))); expected 0600") }
            let password = try String(contentsOfFile: passwordFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            credentials = EtcdStore.Credentials(user: user, password: password)
        }
        return try EtcdStore(endpoints: endpoints, tls: tls, credentials: credentials)
    }

    static func parse(_ v: YAMLValue) throws -> StoreConfig {
        let m = try v.mapping(allowedKeys: ["etcd", "ca", "cert", "key", "prefix", "user", "passwordFile"])
        guard let e = m["etcd"] else { throw v.error("a store needs 'etcd' (a list of client URLs)") }
        let urls = try e.sequence().map { u -> String in
            let s = try u.string()
            guard s.hasPrefix("http://") || s.hasPrefix("https://"), URL(string: s)?.host != nil else {
                throw u.error("expected an etcd client URL (http://HOST:PORT or https://HOST:PORT), got '\(s)'")
            }
            return s
        }
        guard !urls.isEmpty else { throw e.error("expected at least one etcd URL") }
        var c = StoreConfig(endpoints: urls)
        for (key, set) in [("ca", { (s: String) in c.caFile = s }), ("cert", { c.certificateFile = $0 }), ("key", { c.keyFile = $0 })] {
            if let f = m[key] {
                let path = try f.string()
                guard path.hasPrefix("/"), FileManager.default.isReadableFile(atPath: path) else { throw f.error("expected a readable absolute path, got '\(path)'") }
                set(path)
            }
        }
        if (c.certificateFile == nil) != (c.keyFile == nil) { throw v.error("'cert' and 'key' go together") }
        if let u = m["user"] { c.user = try u.string() }
        if let f = m["passwordFile"] {
            let path = try f.string()
            guard path.hasPrefix("/"), FileManager.default.isReadableFile(atPath: path) else { throw f.error("expected a readable absolute path, got '\(path)'") }
            c.passwordFile = path
        }
        if (c.user == nil) != (c.passwordFile == nil) { throw v.error("'user' and 'passwordFile' go together") }
        if urls.contains(where: { $0.hasPrefix("https://") }) && c.caFile == nil { throw v.error("https etcd URLs need 'ca' (the etcd CA bundle)") }
        if let p = m["prefix"] {
            let s = try p.string()
            guard s.hasPrefix("/") && s.hasSuffix("/") else { throw p.error("expected a key prefix like /palisade/, got '\(s)'") }
            c.prefix = s
        }
        return c
    }
}
