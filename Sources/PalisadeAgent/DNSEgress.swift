import CPalisadeShared
import Foundation
import Logging
import NIOConcurrencyHelpers
import PalisadeDatapath
import PalisadeDNS
import PalisadeIdentity
import PalisadeMetrics
import PalisadePolicy

/// toFQDNs on this node: the DNS proxy's view of the policy in the kernel,
/// and how what it learns gets there. The proxy's threads call in; the
/// agent's loop calls `expire` and answers requests for a new generation.
public final class FQDNEgress: @unchecked Sendable {
    let cache: FQDNCache
    let datapath: Datapath
    let log: Logger
    /// The compiled policy the kernel holds (set by every apply).
    let installed = NIOLockedValueBox<CompiledLookup?>(nil)
    /// An answer needs a class the generation in force lacks (a new set of
    /// selectors for one address): the agent's loop applies a new one.
    let generationWanted = NIOLockedValueBox(false)
    static let generationWait: TimeInterval = 3
    let saveLock = NSLock()

    /// STATE/fqdn.json, and beside it a journal (fqdn.json.journal) that
    /// each answer's new bindings are appended to before the kernel is
    /// written, so an agent killed at any point restarts with everything
    /// the kernel holds; the loop folds the journal into the file.
    let file: String
    var journal: String { file + ".journal" }

    init(cache: FQDNCache, datapath: Datapath, log: Logger, file: String) {
        self.cache = cache; self.datapath = datapath; self.log = log; self.file = file
    }

    /// DNS rules: nil (no rule for the workload) allows every name.
    func mayResolve(identity: UInt32, name: String) -> Bool {
        guard let rules = installed.withLockedValue({ $0?.compiled.dnsRules[NumericIdentity(identity)] }) else { return true }
        return rules.contains { $0.matches(name) }
    }

    /// Records an answer in the cache: the addresses whose names changed
    /// (to `commit`), and how many were refused (a selector full).
    func record(_ answer: DNSMessage) -> (changed: LearnedNames, refused: Int) {
        let (names, addresses) = answer.resolvedAddresses()
        let selectors = installed.withLockedValue { $0?.compiled.fqdnSelectors } ?? []
        guard !selectors.isEmpty else { return ([:], 0) }
        let (changed, refused) = cache.record(names: names, addresses: addresses, selectors: selectors)
        if !refused.isEmpty {
            log.warning("learned addresses refused: a toFQDNs selector holds its maximum", metadata: [
                "name": "\(answer.questionName)", "refused": "\(refused.map(\.description).joined(separator: ","))",
                "max-per-selector": "\(cache.limits.maxAddressesPerSelector)"])
        }
        return (changed, refused.count)
    }

    /// Saves what changed (journal), then writes the kernel; returns once
    /// the addresses are there (or could not be: then they stay refused,
    /// and the error is logged).
    func commit(_ changed: LearnedNames) {
        appendToJournal(cache.bindings(of: changed.keys))
        install(changed)
    }

    /// Writes the kernel entries of addresses whose names changed; waits for
    /// a new generation when one needs a class the kernel does not have
    /// (`wait`: false from the agent's own loop, which applies it next).
    func install(_ changed: LearnedNames, wait: Bool = true) {
        guard !changed.isEmpty else { return }
        let deadline = Date().addingTimeInterval(FQDNEgress.generationWait)
        var pending = changed
        while !pending.isEmpty {
            do {
                pending = try datapath.exclusively { () throws -> LearnedNames in
                    guard let lookup = installed.withLockedValue({ $0 }) else { return [:] }
                    var writes: [IPCacheEntry] = [], removals: [CIDR] = [], later: LearnedNames = [:]
                    for (a, names) in pending {
                        switch lookup.learnedEntry(a, names: names) {
                        case .some(.some(let e)): writes.append(e)
                        case .some(.none):
                            if let base = lookup.unlearnedEntry(a) { writes.append(base) }
                            else { removals.append(CIDR(address: a, mappedPrefixLength: 128)) }
                        case .none: later[a] = names
                        }
                    }
                    try datapath.writeLearned(writes, remove: removals)
                    return later
                }
            } catch {
                log.error("learned addresses not written to the kernel (they stay refused)", metadata: ["error": "\(error)"])
                return
            }
            if pending.isEmpty { break }
            generationWanted.withLockedValue { $0 = true }
            if !wait { return }
            if Date() > deadline { break }
            usleep(5_000)
        }
        if !pending.isEmpty {
            log.error("learned addresses waited too long for a new generation (they stay refused until the next apply)",
                      metadata: ["addresses": "\(pending.keys.map(\.description).sorted().joined(separator: ","))"])
        }
    }

    /// Bindings past TTL + grace leave the kernel.
    func expire() {
        install(cache.expire(), wait: false)
    }

    // MARK: Saved across restarts

    /// The saved bindings: the file, then the journal's lines (later wins).
    public static func load(_ path: String) -> [FQDNCache.Binding] {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .utc
        var out = FileManager.default.contents(atPath: path).flatMap { try? d.decode([FQDNCache.Binding].self, from: $0) } ?? []
        for journal in [path + ".journal.old", path + ".journal"] {
            for line in (FileManager.default.contents(atPath: journal) ?? Data()).split(separator: 0x0a) {
                out += (try? d.decode([FQDNCache.Binding].self, from: Data(line))) ?? []
            }
        }
        return out
    }

    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.dateEncodingStrategy = .utc
        e.outputFormatting = [.sortedKeys]
        return e
    }()

    func appendToJournal(_ bindings: [FQDNCache.Binding]) {
        guard var data = try? FQDNEgress.encoder.encode(bindings) else { return }
        data.append(0x0a)
        saveLock.lock()
        defer { saveLock.unlock() }
        let fd = open(journal, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { log.error("cannot write the learned-name journal", metadata: ["path": "\(journal)"]); return }
        _ = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }

    /// The whole cache to the file, the journal emptied. The journal is set
    /// aside first (answers go on appending to a new one meanwhile): all it
    /// held was recorded in the cache before, so it is in the snapshot.
    func save(_ path: String) {
        saveLock.lock()
        _ = rename(journal, journal + ".old")
        saveLock.unlock()
        guard let data = try? FQDNEgress.encoder.encode(cache.bindings()) else { return }
        let tmp = path + ".tmp"
        guard FileManager.default.createFile(atPath: tmp, contents: data, attributes: [.posixPermissions: 0o600]) else { return }
        _ = rename(tmp, path)
        unlink(journal + ".old")
    }
}

extension Agent {
    /// Starts the DNS proxy where workloads reach the outbound listener,
    /// and tells the kernel to send enrolled workloads' DNS to it.
    func startDNSProxy() throws {
        guard let port = config.dnsProxyPort, config.outboundPort != nil else {
            try datapath.setDNSProxy(port: 0, udpDescriptor: nil)
            return
        }
        let fqdn = self.fqdn, metrics = self.metrics, log = self.log
        let events = self.events, shared = self.shared
        let hooks = DNSProxyHooks(
            origin: { client, clientPort, local, localPort, tcp in
                guard let o = fqdn.datapath.dnsOrigin(client: client, clientPort: clientPort, agent: local, agentPort: localPort, tcp: tcp) else { return nil }
                return DNSOrigin(resolver: IPAddress(tuple: o.addr), resolverPort: UInt16(bigEndian: o.port), identity: o.identity, cgroupID: o.cgroup_id)
            },
            mayResolve: { identity, name in fqdn.mayResolve(identity: identity, name: name) },
            record: { _, answer in
                let (changed, refused) = fqdn.record(answer)
                if refused > 0 { metrics.recordLearnedRefused(refused) }
                return changed
            },
            commit: { changed in
                fqdn.commit(changed)
                metrics.setLearnedAddresses(fqdn.cache.addressCount)
            },
            exchanged: { x in
                metrics.recordDNS(result: x.result.rawValue, seconds: x.seconds)
                guard let o = x.origin else {
                    log.warning("DNS datagram the kernel did not redirect, dropped", metadata: ["client": "\(x.client)", "tcp": "\(x.tcp)"])
                    return
                }
                let state = shared.state
                let refused = x.result == .refused
                events?.publish(FlowEvent(
                    time: Date(), verdict: refused ? Outcome.denied.rawValue : Outcome.allowed.rawValue,
                    reason: "dns-\(x.result.rawValue)", direction: Direction.egress.rawValue,
                    source: x.client.description, destination: o.resolver.description, sourcePort: 0, destinationPort: o.resolverPort,
                    proto: x.tcp ? "TCP" : "UDP", localIdentity: o.identity, peerIdentity: 0, local: state.name(of: o.identity), peer: "resolver",
                    rule: nil, ifindex: 0, cgroupID: o.cgroupID, dnsName: x.name, dnsAnswer: x.addresses.map(\.description), dnsResult: x.result.rawValue))
                if refused {
                    log.info("DNS name refused by the workload's DNS rules", metadata: ["name": "\(x.name)", "workload": "\(state.name(of: o.identity))"])
                }
            })
        let proxy = try DNSProxy(port: port, group: meshGroup, hooks: hooks)
        try datapath.setDNSProxy(port: UInt16(proxy.port), udpDescriptor: proxy.udpDescriptor)
        dnsProxy = proxy
        log.info("DNS proxy", metadata: ["port": "\(proxy.port)", "redirects": "UDP and TCP port 53 of enrolled workloads, while the proxy runs"])
    }

    /// From the loop: a new generation when an answer needs one, expiry
    /// once a second, the cache saved when it changed.
    func tickFQDN() {
        if fqdn.generationWanted.withLockedValue({ let w = $0; $0 = false; return w }), let u = lastUniverse {
            applyPolicy(universe: u)
            saveState()
        }
        guard Date().timeIntervalSince(lastFQDNTick) >= 1 else { return }
        lastFQDNTick = Date()
        fqdn.expire()
        let version = fqdn.cache.version
        if version != fqdnSavedVersion {
            fqdnSavedVersion = version
            fqdn.save(config.fqdnFile)
            metrics.setLearnedAddresses(fqdn.cache.addressCount)
        }
    }
}
